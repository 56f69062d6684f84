"""The loader against a plain primary with a replica, and against a Redis Cluster."""

from __future__ import annotations

import json
from typing import Iterator

import pytest
import redis
from click.testing import CliRunner, Result

from concurrent_runs_loader import (
    PRIMARY,
    REPLICA,
    LoaderError,
    NodeLoadResult,
    deploy_library,
    library_status,
)
from concurrent_runs_loader.cli import main

from cluster import (  # noqa: F401
    LocalCluster,
    PrimaryWithReplica,
    primary_with_replica,
    redis_cluster,
    wait_for,
)
from loader_support import (
    NEWER_PATCH,
    OLDER_MINOR,
    PACKAGED,
    add_ended_slots,
    installed_version,
    load_version,
    source_with_version,
)
from servers import RedisServer

SYNC_TIMEOUT_S = 10.0
NO_URL_ENV = {"CONCURRENT_RUNS_REDIS_URL": None, "REDIS_URL": None}


def run(*args: str) -> Result:
    return CliRunner(env=NO_URL_ENV).invoke(main, list(args), catch_exceptions=False)


def version_of(server: RedisServer) -> str | None:
    with server.client(socket_timeout=5) as client:
        return installed_version(client)


def flush_functions(primaries: list[RedisServer], replicas: list[RedisServer]) -> None:
    """Delete the library on every primary and wait until the replicas follow."""
    for primary in primaries:
        with primary.client(socket_timeout=5) as client:
            client.function_flush()

    def replica_with_library() -> str | None:
        for replica in replicas:
            if version_of(replica) is not None:
                return f"{replica.address} still has a library"
        return None

    wait_for(replica_with_library, SYNC_TIMEOUT_S, "the replicas kept the library")


def wait_until_replicas_have(replicas: list[RedisServer], version: str) -> None:
    def replica_behind() -> str | None:
        for replica in replicas:
            seen = version_of(replica)
            if seen != version:
                return f"{replica.address} has {seen}"
        return None

    wait_for(replica_behind, SYNC_TIMEOUT_S, f"the replicas did not get {version}")


# A plain primary with one replica ----------------------------------------------


@pytest.fixture
def pair(primary_with_replica: PrimaryWithReplica) -> PrimaryWithReplica:
    """The module's primary and replica, both without a library."""
    flush_functions([primary_with_replica.primary], [primary_with_replica.replica])
    return primary_with_replica


class TestPrimaryWithReplica:
    def test_deploy_primary_checks_replica(self, pair):
        result = deploy_library(pair.primary.url)
        assert result.ok
        assert not result.cluster
        assert result.nodes == [
            NodeLoadResult(pair.primary.address, PRIMARY, "installed", None, PACKAGED),
            NodeLoadResult(
                pair.replica.address, REPLICA, "replicated", PACKAGED, PACKAGED
            ),
        ]
        assert version_of(pair.replica) == PACKAGED

    def test_load_command_reports_replica(self, pair):
        result = run("load", "--url", pair.primary.url)
        assert result.exit_code == 0
        assert result.stdout == (
            f"{pair.primary.address} primary: installed {PACKAGED}\n"
            f"{pair.replica.address} replica: has {PACKAGED}\n"
        )

    def test_load_dry_run_reports_replica_version(self, pair):
        result = run("load", "--url", pair.primary.url, "--dry-run")
        assert result.exit_code == 0
        assert result.stdout == (
            f"{pair.primary.address} primary: would install {PACKAGED}\n"
            f"{pair.replica.address} replica: has no library\n"
        )
        assert version_of(pair.primary) is None

    def test_load_rejected_primary_leaves_replica_unchecked(self, pair):
        with pair.primary.client() as client:
            load_version(client, NEWER_PATCH)
        wait_until_replicas_have([pair.replica], NEWER_PATCH)
        result = run("load", "--url", pair.primary.url)
        assert result.exit_code == 1
        assert result.stdout == (
            f"{pair.replica.address} replica: not checked: its primary "
            f"{pair.primary.address} was not loaded\n"
        )
        assert result.stderr.startswith(f"{pair.primary.address} primary: rejected: ")

    def test_deploy_diverged_replica_fails_after_timeout(self, pair):
        run("load", "--url", pair.primary.url)
        wait_until_replicas_have([pair.replica], PACKAGED)
        with pair.replica.client() as replica:
            replica.config_set("replica-read-only", "no")
            try:
                replica.function_load(source_with_version(OLDER_MINOR), replace=True)
            finally:
                replica.config_set("replica-read-only", "yes")

        result = deploy_library(pair.primary.url, replica_timeout_s=0.2)
        assert not result.ok
        assert result.nodes[0].outcome == "unchanged"
        assert result.failed == [
            NodeLoadResult(
                pair.replica.address,
                REPLICA,
                "failed",
                OLDER_MINOR,
                OLDER_MINOR,
                f"still has {OLDER_MINOR} after 0.2 s, expected {PACKAGED} from its "
                "primary",
            )
        ]

    def test_deploy_replica_timeout_zero_only_reads_replica(self, pair):
        result = deploy_library(pair.primary.url, replica_timeout_s=0)
        assert result.nodes[0].outcome == "installed"
        assert result.nodes[1].outcome == "replicated"

    def test_deploy_replica_url_raises(self, pair):
        with pytest.raises(LoaderError) as caught:
            deploy_library(pair.replica.url)
        assert str(caught.value) == (
            f"Could not load the library on {pair.replica.address}: it is a replica "
            f"of {pair.primary.address}, and replicas receive functions from their "
            "primary; point --url at the primary"
        )
        assert version_of(pair.primary) is None

    def test_status_lists_primary_and_replica(self, pair):
        run("load", "--url", pair.primary.url)
        rows = library_status(pair.primary.url)
        assert [(row.address, row.role, row.library_version) for row in rows] == [
            (pair.primary.address, PRIMARY, PACKAGED),
            (pair.replica.address, REPLICA, PACKAGED),
        ]

    def test_status_of_replica_url_lists_replica(self, pair):
        result = run("status", "--url", pair.replica.url, "--json")
        assert result.exit_code == 0
        [row] = json.loads(result.stdout)
        assert row["address"] == pair.replica.address
        assert row["role"] == "replica"
        assert row["library_version"] is None

    def test_count_on_replica_url_reads_replica(self, pair):
        run("load", "--url", pair.primary.url)
        with pair.primary.client() as client:
            client.fcall("runs_acquire", 1, "concurrent_runs:jobs", 3, 60000, "token")
        pair.wait_until_replicated()
        result = run("count", "jobs", "--url", pair.replica.url)
        assert result.exit_code == 0
        assert result.stdout == "1\n"


# A Redis Cluster of 3 primaries with one replica each --------------------------


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The module's cluster, with no library and no keys on any node."""
    flush_functions(redis_cluster.primaries(), redis_cluster.replicas())
    for primary in redis_cluster.primaries():
        with primary.client() as client:
            client.flushall()
    yield redis_cluster


def expected_lines(cluster: LocalCluster, primary_word: str, replica_word: str) -> str:
    """Return load's report lines: primaries by port, each followed by its replicas."""
    lines = []
    for primary in sorted(cluster.primaries(), key=lambda node: node.port):
        lines.append(f"{primary.address} primary: {primary_word}")
        for replica in sorted(cluster.replicas_of(primary), key=lambda node: node.port):
            lines.append(f"{replica.address} replica: {replica_word}")
    return "".join(line + "\n" for line in lines)


def keys_on_every_primary(cluster: LocalCluster) -> dict[int, str]:
    """Return a logical key per primary port whose Redis key that primary serves."""
    keys: dict[int, str] = {}
    index = 0
    while len(keys) < len(cluster.primaries()):
        key = f"job-{index}"
        keys.setdefault(cluster.primary_of("concurrent_runs:" + key).port, key)
        index += 1
    return keys


class TestCluster:
    def test_deploy_loads_every_primary(self, cluster):
        result = deploy_library(cluster.url)
        assert result.ok
        assert result.cluster
        primaries = [node for node in result.nodes if node.role == PRIMARY]
        replicas = [node for node in result.nodes if node.role == REPLICA]
        assert len(primaries) == 3
        assert len(replicas) == 3
        assert {node.outcome for node in primaries} == {"installed"}
        assert {node.outcome for node in replicas} == {"replicated"}
        for node in cluster.nodes:
            assert version_of(node) == PACKAGED

    def test_load_command_reports_node_by_node(self, cluster):
        result = run("load", "--url", cluster.url)
        assert result.exit_code == 0
        assert result.stdout == expected_lines(
            cluster, f"installed {PACKAGED}", f"has {PACKAGED}"
        )
        assert result.stderr == ""

    def test_load_through_replica_reaches_every_primary(self, cluster):
        replica = cluster.replicas()[0]
        result = run("load", "--url", replica.url)
        assert result.exit_code == 0
        assert result.stdout == expected_lines(
            cluster, f"installed {PACKAGED}", f"has {PACKAGED}"
        )

    def test_load_again_is_unchanged(self, cluster):
        run("load", "--url", cluster.url)
        result = run("load", "--url", cluster.url)
        assert result.exit_code == 0
        assert result.stdout == expected_lines(
            cluster, f"unchanged {PACKAGED}", f"has {PACKAGED}"
        )

    def test_load_dry_run_changes_no_node(self, cluster):
        result = run("load", "--url", cluster.url, "--dry-run")
        assert result.exit_code == 0
        assert result.stdout == expected_lines(
            cluster, f"would install {PACKAGED}", "has no library"
        )
        for node in cluster.nodes:
            assert version_of(node) is None

    def test_load_upgrades_only_the_older_primary(self, cluster):
        run("load", "--url", cluster.url)
        older = cluster.primaries()[0]
        with older.client() as client:
            load_version(client, OLDER_MINOR)
        wait_until_replicas_have(cluster.replicas_of(older), OLDER_MINOR)

        result = deploy_library(cluster.url)
        assert result.ok
        outcomes = {node.address: node.outcome for node in result.nodes}
        for primary in cluster.primaries():
            expected = "upgraded" if primary is older else "unchanged"
            assert outcomes[primary.address] == expected
        assert version_of(older) == PACKAGED
        for replica in cluster.replicas_of(older):
            assert version_of(replica) == PACKAGED

    def test_load_names_each_rejected_primary(self, cluster):
        newer = cluster.primaries()[1]
        with newer.client() as client:
            load_version(client, NEWER_PATCH)
        wait_until_replicas_have(cluster.replicas_of(newer), NEWER_PATCH)

        result = run("load", "--url", cluster.url)
        assert result.exit_code == 1
        assert result.stderr == (
            f"{newer.address} primary: rejected: the server has {NEWER_PATCH}, newer "
            f"than this package's {PACKAGED}; pass --force to downgrade it\n"
        )
        for replica in cluster.replicas_of(newer):
            assert (
                f"{replica.address} replica: not checked: its primary "
                f"{newer.address} was not loaded\n"
            ) in result.stdout
        for primary in cluster.primaries():
            if primary is not newer:
                line = f"{primary.address} primary: installed {PACKAGED}\n"
                assert line in result.stdout
        assert version_of(newer) == NEWER_PATCH

    def test_load_with_deploy_acl_installs(self, cluster):
        commands = [
            "+info", "+fcall_ro", "+function|list", "+function|load", "+cluster|nodes",
        ]
        for node in cluster.nodes:
            with node.client() as client:
                client.acl_setuser(
                    "deployer", enabled=True, passwords=["+pw"], commands=commands
                )
        try:
            url = f"redis://deployer:pw@{cluster.nodes[0].address}/0"
            result = run("load", "--url", url)
        finally:
            for node in cluster.nodes:
                with node.client() as client:
                    client.acl_deluser("deployer")
        assert result.exit_code == 0
        assert result.stdout == expected_lines(
            cluster, f"installed {PACKAGED}", f"has {PACKAGED}"
        )

    def test_status_has_one_row_per_node(self, cluster):
        run("load", "--url", cluster.url)
        result = run("status", "--url", cluster.url, "--json")
        assert result.exit_code == 0
        rows = json.loads(result.stdout)
        assert sorted(row["address"] for row in rows) == sorted(
            node.address for node in cluster.nodes
        )
        roles = {row["address"]: row["role"] for row in rows}
        for primary in cluster.primaries():
            assert roles[primary.address] == "primary"
        for replica in cluster.replicas():
            assert roles[replica.address] == "replica"
        assert {row["library_version"] for row in rows} == {PACKAGED}
        assert {row["error"] for row in rows} == {None}

    def test_status_text_has_header_and_six_rows(self, cluster):
        result = run("status", "--url", cluster.url)
        assert result.exit_code == 0
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["ADDRESS", "ROLE", "REDIS", "LIBRARY"]
        assert len(lines) == 8
        assert all(line.split()[3] == "none" for line in lines[1:7])
        assert lines[7] == f"packaged library: {PACKAGED}"

    def test_key_commands_reach_the_owning_primary(self, cluster):
        run("load", "--url", cluster.url)
        keys = keys_on_every_primary(cluster)
        client: redis.cluster.RedisCluster = cluster.client()
        try:
            for port, key in keys.items():
                redis_key = "concurrent_runs:" + key
                client.fcall("runs_acquire", 1, redis_key, 3, 60000, f"token-{port}")
                add_ended_slots(client, redis_key, 2)
        finally:
            client.close()

        for port, key in keys.items():
            assert run("count", key, "--url", cluster.url).stdout == "1\n"
            listed = run("holders", key, "--json", "--url", cluster.url)
            holders = json.loads(listed.stdout)
            assert [holder["token"] for holder in holders] == [f"token-{port}"]
            reaped = run("reap", key, "--url", cluster.url)
            assert reaped.stdout == (
                f"removed 2 ended slots from concurrent_runs:{key}\n"
            )
            released = run("release", key, f"token-{port}", "--url", cluster.url)
            assert released.stdout == f"released token-{port}\n"
            assert run("count", key, "--url", cluster.url).stdout == "0\n"

    def test_key_command_without_library_names_load(self, cluster):
        result = run("count", "jobs", "--url", cluster.url)
        assert result.exit_code == 1
        assert result.stderr == (
            "Error: Could not run runs_count on key 'concurrent_runs:jobs': the "
            f"concurrent_runs library is not loaded on the cluster at "
            f"{cluster.nodes[0].address}; run `concurrent-runs load`\n"
        )
