"""The limiters on a Redis Cluster: operations, self-loading, failover, upgrades."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import Iterator

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from concurrent_runs import (
    AsyncConcurrentRunsLimiter,
    ConcurrentRunsLimiter,
    LibraryVersionError,
)
from concurrent_runs.library import library_source, packaged_version

from cluster import (  # noqa: F401
    LimiterWorkload,
    LocalCluster,
    installed_version,
    library_source_of_version,
    redis_cluster,
    server_role,
    wait_for,
)

PREFIX = "concurrent_runs:"
SPREAD_KEY_COUNT = 300
INCOMPATIBLE_VERSION = "2.0.0"


def upgraded_minor() -> str:
    major, minor, patch = packaged_version().split(".")
    return f"{major}.{int(minor) + 1}.0"


def library_names(server) -> list[str]:
    with server.client(socket_timeout=5) as client:
        return [
            redis.utils.str_if_bytes(entry[1]) for entry in client.function_list()
        ]


def flush_library(server) -> None:
    with server.client(socket_timeout=5) as client:
        client.function_flush()


def load_version(server, version: str) -> None:
    """Replace the library on ``server`` with the packaged one set to ``version``."""
    with server.client(socket_timeout=5) as client:
        client.function_load(library_source_of_version(version), replace=True)


def shard_subscribers(server, channel: str) -> int:
    """Return how many clients of ``server`` subscribe to the sharded ``channel``."""
    with server.client(socket_timeout=5) as client:
        reply = client.execute_command("PUBSUB SHARDNUMSUB", channel)
    return int(dict(reply)[channel.encode()])


def polling_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return the warnings of waiters that could not subscribe and fell back to polling."""
    messages = [record.getMessage() for record in caplog.records]
    return [message for message in messages if "polling" in message]


def key_of_each_primary(cluster: LocalCluster, name: str) -> dict[int, str]:
    """Return a new logical key for each primary, by the primary's port."""
    tag = uuid.uuid4().hex[:8]
    keys: dict[int, str] = {}
    for index in range(1000):
        key = f"{name}-{tag}-{index}"
        keys.setdefault(cluster.primary_of(PREFIX + key).port, key)
        if len(keys) == cluster.primary_count:
            return keys
    raise AssertionError("1000 key names did not reach every primary")


def key_on_other_shard(cluster: LocalCluster, primary) -> str:
    """Return a new logical key whose slot another primary than ``primary`` serves."""
    keys = key_of_each_primary(cluster, "other")
    return next(key for port, key in keys.items() if port != primary.port)


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> LocalCluster:
    """The module's cluster, ready, with the packaged library on every primary."""
    redis_cluster.wait_until_ready()
    redis_cluster.load_library(library_source())
    return redis_cluster


@pytest.fixture
def cluster_limiter(cluster: LocalCluster) -> Iterator[ConcurrentRunsLimiter]:
    limiter = ConcurrentRunsLimiter(client=cluster.client(), slot_timeout=30)
    yield limiter
    limiter.close()


@pytest.fixture
async def async_cluster_limiter(cluster: LocalCluster) -> AsyncConcurrentRunsLimiter:
    limiter = AsyncConcurrentRunsLimiter(client=cluster.async_client(), slot_timeout=30)
    yield limiter
    await limiter.close()


class TestClusterOperations:
    def test_every_operation_works(self, cluster_limiter, key):
        first = cluster_limiter.acquire(key, 2)
        second = cluster_limiter.acquire(key, 2)

        assert first is not None
        assert second is not None
        assert cluster_limiter.acquire(key, 2) is None
        assert cluster_limiter.get_count(key) == 2
        assert set(cluster_limiter.get_holders(key)) == {first, second}
        assert cluster_limiter.extend(key, first, 60) is True
        assert cluster_limiter.release(key, first) is True
        assert cluster_limiter.release(key, first) is False
        assert cluster_limiter.get_count(key) == 1

    def test_slot_releases_on_exit(self, cluster_limiter, key):
        with cluster_limiter.slot(key, 1) as token:
            assert cluster_limiter.get_holders(key).keys() == {token}

        assert cluster_limiter.get_count(key) == 0

    def test_keys_spread_over_every_primary(self, cluster, cluster_limiter):
        keys_by_port: dict[int, list[str]] = {}
        for index in range(SPREAD_KEY_COUNT):
            key = f"spread-{uuid.uuid4().hex[:8]}-{index}"
            node = cluster_limiter.client.get_node_from_key(PREFIX + key)
            keys_by_port.setdefault(node.port, []).append(key)

        assert set(keys_by_port) == {node.port for node in cluster.primaries()}
        for keys in keys_by_port.values():
            for key in keys:
                token = cluster_limiter.acquire(key, 1)
                assert token is not None
                assert cluster_limiter.get_count(key) == 1
                assert cluster_limiter.release(key, token) is True

    def test_hash_tagged_keys_share_one_primary(self, cluster):
        tag = uuid.uuid4().hex[:8]
        ports = {
            cluster.primary_of(f"{PREFIX}{{tenant-{tag}}}:agent-{name}").port
            for name in "abcdefgh"
        }

        assert len(ports) == 1

    def test_cluster_flag_builds_cluster_client(self, cluster, key):
        with ConcurrentRunsLimiter(cluster.url, cluster=True) as limiter:
            token = limiter.acquire(key, 1)

            assert isinstance(limiter.client, redis.cluster.RedisCluster)
            assert token is not None
            assert limiter.release(key, token) is True

    def test_cluster_variable_builds_cluster_client(
        self, cluster, key, monkeypatch
    ):
        monkeypatch.setenv("CONCURRENT_RUNS_CLUSTER", "1")

        with ConcurrentRunsLimiter(cluster.url) as limiter:
            assert isinstance(limiter.client, redis.cluster.RedisCluster)
            assert limiter.acquire(key, 1) is not None

    def test_waiter_woken_by_sharded_message(
        self, cluster, cluster_limiter, key, caplog
    ):
        holder = cluster_limiter.acquire(key, 1)
        primary = cluster.primary_of(PREFIX + key)
        result: dict[str, object] = {}

        def wait_for_slot() -> None:
            result["token"] = cluster_limiter.acquire(key, 1, wait=10)

        waiter = threading.Thread(target=wait_for_slot)
        with caplog.at_level(logging.WARNING, logger="concurrent_runs"):
            waiter.start()
            wait_for(
                lambda: None if shard_subscribers(primary, PREFIX + key) == 1 else "no",
                10,
                "the waiter did not subscribe on the key's primary",
            )
            cluster_limiter.release(key, holder)
            waiter.join(timeout=15)

        assert not waiter.is_alive()
        assert isinstance(result["token"], str)
        assert cluster_limiter.get_holders(key).keys() == {result["token"]}
        assert not polling_warnings(caplog)


class TestAsyncClusterOperations:
    async def test_every_operation_works(self, async_cluster_limiter, key):
        limiter = async_cluster_limiter
        first = await limiter.acquire(key, 2)
        second = await limiter.acquire(key, 2)

        assert first is not None
        assert second is not None
        assert await limiter.acquire(key, 2) is None
        assert await limiter.get_count(key) == 2
        assert set(await limiter.get_holders(key)) == {first, second}
        assert await limiter.extend(key, first, 60) is True
        assert await limiter.release(key, first) is True
        assert await limiter.release(key, first) is False
        assert await limiter.get_count(key) == 1

    async def test_slot_releases_on_exit(self, async_cluster_limiter, key):
        async with async_cluster_limiter.slot(key, 1) as token:
            assert (await async_cluster_limiter.get_holders(key)).keys() == {token}

        assert await async_cluster_limiter.get_count(key) == 0

    async def test_cluster_flag_builds_cluster_client(self, cluster, key):
        async with AsyncConcurrentRunsLimiter(cluster.url, cluster=True) as limiter:
            token = await limiter.acquire(key, 1)

            assert isinstance(limiter.client, redis.asyncio.cluster.RedisCluster)
            assert token is not None
            assert await limiter.release(key, token) is True

    async def test_cluster_variable_builds_cluster_client(
        self, cluster, key, monkeypatch
    ):
        monkeypatch.setenv("CONCURRENT_RUNS_CLUSTER", "yes")

        async with AsyncConcurrentRunsLimiter(cluster.url) as limiter:
            assert isinstance(limiter.client, redis.asyncio.cluster.RedisCluster)
            assert await limiter.acquire(key, 1) is not None

    async def test_waiter_woken_by_sharded_message(
        self, cluster, async_cluster_limiter, key, caplog
    ):
        limiter = async_cluster_limiter
        holder = await limiter.acquire(key, 1)
        primary = cluster.primary_of(PREFIX + key)

        with caplog.at_level(logging.WARNING, logger="concurrent_runs"):
            waiter = asyncio.ensure_future(limiter.acquire(key, 1, wait=10))
            for _ in range(500):
                if shard_subscribers(primary, PREFIX + key) == 1:
                    break
                await asyncio.sleep(0.02)
            subscribers = shard_subscribers(primary, PREFIX + key)
            await limiter.release(key, holder)
            token = await asyncio.wait_for(waiter, 15)

        assert subscribers == 1
        assert isinstance(token, str)
        assert (await limiter.get_holders(key)).keys() == {token}
        assert not polling_warnings(caplog)


class TestClusterLibraryLoading:
    def test_call_reloads_flushed_primary(
        self, cluster, cluster_limiter
    ):
        # Each primary in turn, because redis-py's own FUNCTION LOAD fan-out
        # reaches a flushed primary only when it comes first.
        for port, key in key_of_each_primary(cluster, "flushed").items():
            token = cluster_limiter.acquire(key, 2)
            primary = cluster.node_at(port)
            flush_library(primary)

            assert cluster_limiter.get_count(key) == 1
            assert cluster_limiter.release(key, token) is True
            assert library_names(primary) == ["concurrent_runs"]

    def test_first_call_loads_every_primary(self, cluster, key):
        for primary in cluster.primaries():
            flush_library(primary)

        with ConcurrentRunsLimiter(cluster.url, cluster=True) as limiter:
            assert limiter.acquire(key, 1) is not None

        for primary in cluster.primaries():
            assert library_names(primary) == ["concurrent_runs"]

    def test_first_call_loads_bare_primary(self, cluster):
        for bare in cluster.primaries():
            flush_library(bare)
            key = key_on_other_shard(cluster, bare)

            with ConcurrentRunsLimiter(cluster.url, cluster=True) as limiter:
                assert limiter.acquire(key, 1) is not None

            assert library_names(bare) == ["concurrent_runs"]
            assert installed_version(bare) == packaged_version()

    def test_version_check_reads_every_primary(self, cluster):
        for other_major in cluster.primaries():
            load_version(other_major, INCOMPATIBLE_VERSION)
            key = key_on_other_shard(cluster, other_major)

            with ConcurrentRunsLimiter(cluster.url, cluster=True) as limiter:
                with pytest.raises(LibraryVersionError) as raised:
                    limiter.acquire(key, 1)

            assert raised.value.installed == INCOMPATIBLE_VERSION
            assert raised.value.packaged == packaged_version()
            load_version(other_major, packaged_version())


class TestAsyncClusterLibraryLoading:
    async def test_call_reloads_flushed_primary(
        self, cluster, async_cluster_limiter
    ):
        limiter = async_cluster_limiter
        for port, key in key_of_each_primary(cluster, "flushed").items():
            token = await limiter.acquire(key, 2)
            primary = cluster.node_at(port)
            flush_library(primary)

            assert await limiter.get_count(key) == 1
            assert await limiter.release(key, token) is True
            assert library_names(primary) == ["concurrent_runs"]

    async def test_first_call_loads_bare_primary(self, cluster):
        for bare in cluster.primaries():
            flush_library(bare)
            key = key_on_other_shard(cluster, bare)

            async with AsyncConcurrentRunsLimiter(cluster.url, cluster=True) as limiter:
                assert await limiter.acquire(key, 1) is not None

            assert library_names(bare) == ["concurrent_runs"]

    async def test_version_check_reads_every_primary(self, cluster):
        for other_major in cluster.primaries():
            load_version(other_major, INCOMPATIBLE_VERSION)
            key = key_on_other_shard(cluster, other_major)

            async with AsyncConcurrentRunsLimiter(cluster.url, cluster=True) as limiter:
                with pytest.raises(LibraryVersionError) as raised:
                    await limiter.acquire(key, 1)

            assert raised.value.installed == INCOMPATIBLE_VERSION
            load_version(other_major, packaged_version())


class TestClusterFailover:
    def test_failover_keeps_limit_and_held_slots(self, cluster):
        tag = uuid.uuid4().hex[:8]
        keys = [f"{{failover-{tag}}}:job-{index}" for index in range(2)]
        held_key = f"{{failover-{tag}}}:held"
        old_primary = cluster.primary_of(PREFIX + held_key)
        promoted = cluster.replicas_of(old_primary)[0]
        long_lease = ConcurrentRunsLimiter(cluster.url, slot_timeout=60, cluster=True)
        held_tokens = [long_lease.acquire(held_key, 5) for _ in range(2)]
        with old_primary.client(socket_timeout=5) as client:
            assert client.wait(1, 5000) == 1

        workload = LimiterWorkload(
            lambda: ConcurrentRunsLimiter(cluster.url, slot_timeout=3, cluster=True),
            keys,
            max_slots=3,
            waiting_workers=2,
            count_reader=long_lease.get_count,
        )
        try:
            with workload:
                workload.wait_for_progress(3)
                cluster.failover(promoted)
                workload.mark()
                workload.wait_for_progress(5)
            holders_after = long_lease.get_holders(held_key)
            released = [long_lease.release(held_key, token) for token in held_tokens]
            promoted_role = server_role(promoted)
            promoted_version = installed_version(promoted)
        finally:
            long_lease.close()
            if server_role(promoted) == "master":
                cluster.failover(old_primary)
        print(f"failover of {old_primary.address}: {workload.summary()}")

        assert promoted_role == "master"
        assert promoted_version == packaged_version()
        assert workload.errors == [], workload.summary()
        assert workload.violations == [], workload.summary()
        assert workload.max_holding <= 3
        assert workload.lost_releases == 0, workload.summary()
        assert set(held_tokens) <= holders_after.keys()
        assert released == [True, True]

    def test_calls_resume_after_primary_crash(self, cluster):
        tag = uuid.uuid4().hex[:8]
        keys = [f"{{crash-{tag}}}:job-{index}" for index in range(2)]
        crashed = cluster.primary_of(PREFIX + keys[0])
        promoted = cluster.replicas_of(crashed)[0]
        workload = LimiterWorkload(
            lambda: ConcurrentRunsLimiter(cluster.url, slot_timeout=3, cluster=True),
            keys,
            max_slots=3,
            waiting_workers=2,
        )
        try:
            with workload:
                workload.wait_for_progress(3)
                cluster.crash(crashed)
                cluster.wait_until_promoted(promoted)
                workload.mark()
                workload.wait_for_progress(5)
            promoted_version = installed_version(promoted)
        finally:
            if crashed.process is not None and crashed.process.poll() is not None:
                crashed.start()
            cluster.wait_until_ready()
            if server_role(crashed) == "slave":
                cluster.failover(crashed)
        print(f"crash of {crashed.address}: {workload.summary()}")

        assert promoted_version == packaged_version()
        assert workload.errors == [], workload.summary()
        assert workload.violations == [], workload.summary()


class TestClusterRollingUpgrade:
    def test_rolling_upgrade_fails_no_call(self, cluster):
        keys_by_port = key_of_each_primary(cluster, "upgrade")
        new_version = upgraded_minor()
        new_source = library_source_of_version(new_version)

        workload = LimiterWorkload(
            lambda: ConcurrentRunsLimiter(cluster.url, slot_timeout=3, cluster=True),
            list(keys_by_port.values()),
            max_slots=2,
            waiting_workers=2,
        )
        with workload:
            workload.wait_for_progress(3)
            for primary in cluster.primaries():
                with primary.client(socket_timeout=5) as client:
                    client.function_load(new_source, replace=True)
                workload.mark()
                workload.wait_for_progress(2)
        print(f"rolling upgrade to {new_version}: {workload.summary()}")

        assert workload.errors == [], workload.summary()
        assert workload.unavailable_errors == 0, workload.summary()
        assert workload.violations == [], workload.summary()
        assert workload.max_holding <= 2
        for primary in cluster.primaries():
            assert installed_version(primary) == new_version

    def test_deploy_from_replica_loads_every_primary(self, cluster, key):
        from concurrent_runs_loader import deploy_library

        for primary in cluster.primaries():
            flush_library(primary)
        replica_url = cluster.replicas()[0].url

        result = deploy_library(replica_url)

        assert result.ok
        for primary in cluster.primaries():
            assert installed_version(primary) == packaged_version()
