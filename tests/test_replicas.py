"""Replicas: the reads they serve, the library they receive, upgrades meanwhile."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest
import redis
import redis.asyncio

from concurrent_runs import (
    AsyncConcurrentRunsLimiter,
    ConcurrentRunsError,
    ConcurrentRunsLimiter,
)
from concurrent_runs.library import library_source, packaged_version

from cluster import (  # noqa: F401
    LimiterWorkload,
    LocalCluster,
    PrimaryWithReplica,
    command_calls,
    installed_version,
    library_source_of_version,
    primary_with_replica,
    redis_cluster,
)

PREFIX = "concurrent_runs:"


def upgraded_minor() -> str:
    major, minor, _patch = packaged_version().split(".")
    return f"{major}.{int(minor) + 1}.0"


def replica_count(pair: PrimaryWithReplica, redis_key: str) -> int:
    """Return runs_count of ``redis_key`` as the replica serves it (FCALL_RO)."""
    with pair.replica.client(socket_timeout=5) as client:
        return int(client.fcall_ro("runs_count", 1, redis_key))


@pytest.fixture
def pair(primary_with_replica: PrimaryWithReplica) -> PrimaryWithReplica:
    """The module's primary and replica, with the packaged library on both."""
    with primary_with_replica.primary.client(socket_timeout=5) as client:
        client.function_load(library_source(), replace=True)
    primary_with_replica.wait_until_replicated()
    return primary_with_replica


@pytest.fixture
def primary_limiter(pair: PrimaryWithReplica) -> Iterator[ConcurrentRunsLimiter]:
    limiter = ConcurrentRunsLimiter(pair.primary.url, slot_timeout=30)
    yield limiter
    limiter.close()


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> LocalCluster:
    redis_cluster.wait_until_ready()
    redis_cluster.load_library(library_source())
    return redis_cluster


class TestPlainReplica:
    def test_replica_count_matches_primary(self, pair, primary_limiter, key):
        tokens = {primary_limiter.acquire(key, 3) for _ in range(2)}
        pair.wait_until_replicated()

        with pair.replica.client(socket_timeout=5) as client:
            count = client.fcall_ro("runs_count", 1, PREFIX + key)
            holders = client.fcall_ro("runs_holders", 1, PREFIX + key)

        assert count == 2
        assert {redis.utils.str_if_bytes(token) for token in holders[::2]} == tokens

    def test_replica_limiter_reads_count(self, pair, primary_limiter, key):
        tokens = {primary_limiter.acquire(key, 3) for _ in range(2)}
        pair.wait_until_replicated()

        with ConcurrentRunsLimiter(pair.replica.url) as replica_limiter:
            assert replica_limiter.get_count(key) == 2
            assert replica_limiter.get_holders(key).keys() == tokens

    def test_replica_limiter_acquire_raises(self, pair, key):
        with ConcurrentRunsLimiter(pair.replica.url) as replica_limiter:
            with pytest.raises(ConcurrentRunsError, match="read only replica"):
                replica_limiter.acquire(key, 1)

    def test_loaded_library_reaches_replica(self, pair, key):
        with pair.primary.client(socket_timeout=5) as client:
            client.function_flush()
        pair.wait_until_replicated()

        with ConcurrentRunsLimiter(pair.primary.url) as limiter:
            assert limiter.acquire(key, 1) is not None
        pair.wait_until_replicated()

        assert installed_version(pair.replica) == packaged_version()
        assert replica_count(pair, PREFIX + key) == 1

    def test_rolling_upgrade_keeps_replica_reads(self, pair):
        tag = uuid.uuid4().hex[:8]
        keys = [f"upgrade-{tag}-{index}" for index in range(2)]
        new_version = upgraded_minor()

        workload = LimiterWorkload(
            lambda: ConcurrentRunsLimiter(pair.primary.url, slot_timeout=3),
            keys,
            max_slots=3,
            waiting_workers=2,
            count_reader=lambda key: replica_count(pair, PREFIX + key),
        )
        with workload:
            workload.wait_for_progress(3)
            new_source = library_source_of_version(new_version)
            with pair.primary.client(socket_timeout=5) as client:
                client.function_load(new_source, replace=True)
            workload.mark()
            workload.wait_for_progress(5)
        pair.wait_until_replicated()
        print(f"rolling upgrade to {new_version}: {workload.summary()}")

        assert workload.errors == [], workload.summary()
        assert workload.unavailable_errors == 0, workload.summary()
        assert workload.violations == [], workload.summary()
        assert workload.max_holding <= 3
        assert workload.count_reads > 0
        assert installed_version(pair.primary) == new_version
        assert installed_version(pair.replica) == new_version


class TestClusterReplicaReads:
    def test_replica_reads_serve_count_and_holders(self, cluster, key):
        with ConcurrentRunsLimiter(
            cluster.url, cluster=True, read_from_replicas=True
        ) as limiter:
            token = limiter.acquire(key, 2)
            primary = cluster.primary_of(PREFIX + key)
            replica = cluster.replicas_of(primary)[0]
            with primary.client(socket_timeout=5) as client:
                assert client.wait(1, 5000) == 1
            replica_calls = command_calls(replica, "fcall_ro")
            primary_calls = command_calls(primary, "fcall_ro")

            count = limiter.get_count(key)
            holders = limiter.get_holders(key)

        assert count == 1
        assert holders.keys() == {token}
        assert command_calls(replica, "fcall_ro") == replica_calls + 2
        assert command_calls(primary, "fcall_ro") == primary_calls

    def test_default_reads_go_to_primary(self, cluster, key):
        with ConcurrentRunsLimiter(cluster.url, cluster=True) as limiter:
            limiter.acquire(key, 2)
            primary = cluster.primary_of(PREFIX + key)
            replica = cluster.replicas_of(primary)[0]
            replica_calls = command_calls(replica, "fcall_ro")
            primary_calls = command_calls(primary, "fcall_ro")

            count = limiter.get_count(key)

        assert count == 1
        assert command_calls(primary, "fcall_ro") == primary_calls + 1
        assert command_calls(replica, "fcall_ro") == replica_calls

    def test_replica_reads_without_cluster_raise(self, pair):
        with pytest.raises(ValueError, match="cluster=True"):
            ConcurrentRunsLimiter(
                pair.primary.url, cluster=False, read_from_replicas=True
            )

    def test_replica_reads_with_client_raise(self, pair):
        client = redis.Redis.from_url(pair.primary.url)
        try:
            with pytest.raises(ValueError, match="load_balancing_strategy"):
                ConcurrentRunsLimiter(client=client, read_from_replicas=True)
        finally:
            client.close()


class TestAsyncClusterReplicaReads:
    async def test_replica_reads_serve_count_and_holders(self, cluster, key):
        async with AsyncConcurrentRunsLimiter(
            cluster.url, cluster=True, read_from_replicas=True
        ) as limiter:
            token = await limiter.acquire(key, 2)
            primary = cluster.primary_of(PREFIX + key)
            replica = cluster.replicas_of(primary)[0]
            with primary.client(socket_timeout=5) as client:
                assert client.wait(1, 5000) == 1
            replica_calls = command_calls(replica, "fcall_ro")
            primary_calls = command_calls(primary, "fcall_ro")

            count = await limiter.get_count(key)
            holders = await limiter.get_holders(key)

        assert count == 1
        assert holders.keys() == {token}
        assert command_calls(replica, "fcall_ro") == replica_calls + 2
        assert command_calls(primary, "fcall_ro") == primary_calls

    async def test_default_reads_go_to_primary(self, cluster, key):
        async with AsyncConcurrentRunsLimiter(cluster.url, cluster=True) as limiter:
            await limiter.acquire(key, 2)
            primary = cluster.primary_of(PREFIX + key)
            replica = cluster.replicas_of(primary)[0]
            replica_calls = command_calls(replica, "fcall_ro")
            primary_calls = command_calls(primary, "fcall_ro")

            count = await limiter.get_count(key)

        assert count == 1
        assert command_calls(primary, "fcall_ro") == primary_calls + 1
        assert command_calls(replica, "fcall_ro") == replica_calls

    async def test_replica_reads_without_cluster_raise(self, pair):
        with pytest.raises(ValueError, match="cluster=True"):
            AsyncConcurrentRunsLimiter(
                pair.primary.url, cluster=False, read_from_replicas=True
            )

    async def test_replica_reads_with_client_raise(self, pair):
        client = redis.asyncio.Redis.from_url(pair.primary.url)
        try:
            with pytest.raises(ValueError, match="load_balancing_strategy"):
                AsyncConcurrentRunsLimiter(client=client, read_from_replicas=True)
        finally:
            await client.aclose()
