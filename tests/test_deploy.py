"""The deploy code that the loader command and deploy scripts share."""

from __future__ import annotations

import logging

import pytest
import redis

from concurrent_runs_loader import (
    PRIMARY,
    REPLICA,
    UNKNOWN_VERSION,
    LoaderError,
    Node,
    NodeLoadResult,
    NodeStatus,
    SlotAdmin,
    check_redis_version,
    deploy_library,
    library_status,
    plan_load,
)
from concurrent_runs_loader.nodes import parse_cluster_nodes, parse_redis_version

from loader_support import (
    NEWER_MAJOR,
    NEWER_PATCH,
    OLDER_MAJOR,
    OLDER_MINOR,
    PACKAGED,
    UNVERSIONED_SOURCE,
    add_ended_slots,
    address_of,
    installed_version,
    load_version,
)
from servers import free_port


@pytest.fixture
def bare_client(redis_client: redis.Redis) -> redis.Redis:
    """A client of the shared server, with no keys and no functions loaded."""
    redis_client.function_flush()
    yield redis_client
    redis_client.function_flush()


@pytest.fixture
def address(redis_url: str) -> str:
    return address_of(redis_url)


class TestPlanLoad:
    def test_plan_without_library_installs(self):
        plan = plan_load(None, "1.1.0")
        assert plan.change == "install"
        assert not plan.needs_force

    def test_plan_same_version_is_unchanged(self):
        plan = plan_load("1.1.0", "1.1.0")
        assert plan.change == "unchanged"
        assert not plan.needs_force

    def test_plan_older_minor_upgrades(self):
        plan = plan_load("1.0.7", "1.1.0")
        assert plan.change == "upgrade"
        assert not plan.needs_force

    def test_plan_newer_patch_needs_force(self):
        plan = plan_load("1.1.1", "1.1.0")
        assert plan.change == "downgrade"
        assert plan.needs_force
        assert plan.rejection() == (
            "the server has 1.1.1, newer than this package's 1.1.0; "
            "pass --force to downgrade it"
        )

    def test_plan_compares_numbers_not_text(self):
        assert plan_load("1.10.0", "1.9.0").change == "downgrade"
        assert plan_load("1.9.0", "1.10.0").change == "upgrade"

    def test_plan_older_major_needs_force(self):
        plan = plan_load("1.4.0", "2.0.0")
        assert plan.change == "major upgrade"
        assert plan.needs_force
        assert "clients built for version 1 stop working" in plan.rejection()

    def test_plan_newer_major_needs_force(self):
        plan = plan_load("3.0.0", "2.5.0")
        assert plan.change == "downgrade"
        assert plan.needs_force

    @pytest.mark.parametrize("installed", [UNKNOWN_VERSION, "1.1", "v1.1.0", ""])
    def test_plan_unrecognised_version_needs_force(self, installed):
        plan = plan_load(installed, "1.1.0")
        assert plan.change == "unrecognised"
        assert plan.needs_force
        assert plan.rejection().endswith("pass --force to replace it")


class TestCheckRedisVersion:
    """Redis 6 cannot run here, so the version check is tested on its own."""

    @pytest.mark.parametrize("version", ["6.2.14", "6.0.0", "5.0.7", "2.8.24"])
    def test_check_before_7_raises(self, version):
        with pytest.raises(LoaderError) as caught:
            check_redis_version(version, "10.0.0.5:6379")
        assert str(caught.value) == (
            f"Could not use Redis at 10.0.0.5:6379: it is version {version}, but "
            "Redis Functions need Redis 7.0 or newer; upgrade the server"
        )

    @pytest.mark.parametrize(
        "version", ["7.0.0", "7.0.15", "7.2.4", "8.0.2", "255.255.255"]
    )
    def test_check_7_or_newer_passes(self, version):
        check_redis_version(version, "10.0.0.5:6379")

    def test_check_unparseable_version_logs_warning(self, caplog):
        with caplog.at_level(logging.WARNING, logger="concurrent_runs_loader"):
            check_redis_version("unstable", "10.0.0.5:6379")
        assert "unparseable version 'unstable'" in caplog.text

    def test_parse_redis_version_splits_numbers(self):
        assert parse_redis_version("7.0.15") == (7, 0, 15)
        with pytest.raises(ValueError):
            parse_redis_version("7.0.x")


CLUSTER_NODES = """\
a1 127.0.0.1:7002@17002 master - 0 1700000000000 2 connected 5461-10922
b1 127.0.0.1:7004@17004,node-4 slave a1 0 1700000000000 2 connected
c1 :7001@17001 myself,master - 0 0 1 connected 0-5460
d1 127.0.0.1:7003@17003 master - 0 1700000000000 3 connected 10923-16383
e1 127.0.0.1:7006@17006 slave d1 0 1700000000000 3 connected
f1 127.0.0.1:7005@17005 slave c1 0 1700000000000 1 connected
g1 :0@0 master,noaddr - 0 1700000000000 0 disconnected
h1 127.0.0.1:7010@17010 handshake - 0 0 0 connected
"""


class TestParseClusterNodes:
    def test_parse_orders_primaries_then_their_replicas(self):
        nodes = parse_cluster_nodes(CLUSTER_NODES, default_host="127.0.0.1")
        assert [(node.address, node.role, node.primary) for node in nodes] == [
            ("127.0.0.1:7001", PRIMARY, None),
            ("127.0.0.1:7005", REPLICA, "127.0.0.1:7001"),
            ("127.0.0.1:7002", PRIMARY, None),
            ("127.0.0.1:7004", REPLICA, "127.0.0.1:7002"),
            ("127.0.0.1:7003", PRIMARY, None),
            ("127.0.0.1:7006", REPLICA, "127.0.0.1:7003"),
        ]

    def test_parse_fills_empty_host_with_default(self):
        nodes = parse_cluster_nodes(CLUSTER_NODES, default_host="10.1.1.1")
        assert Node("10.1.1.1:7001", PRIMARY, host="10.1.1.1", port=7001) in nodes

    def test_parse_replica_of_unknown_primary_keeps_none(self):
        text = "r1 127.0.0.1:7009@17009 slave zz 0 0 1 connected\n"
        nodes = parse_cluster_nodes(text, default_host="127.0.0.1")
        assert [(node.address, node.role, node.primary) for node in nodes] == [
            ("127.0.0.1:7009", REPLICA, None)
        ]


class TestDeployLibrary:
    def test_deploy_empty_server_installs(self, redis_url, bare_client, address):
        result = deploy_library(redis_url)
        assert result.ok
        assert not result.cluster
        assert result.packaged_version == PACKAGED
        assert result.nodes == [
            NodeLoadResult(address, PRIMARY, "installed", None, PACKAGED)
        ]
        assert result.nodes[0].describe() == f"{address} primary: installed {PACKAGED}"
        assert installed_version(bare_client) == PACKAGED

    def test_deploy_loaded_server_is_unchanged(self, redis_url, bare_client, address):
        deploy_library(redis_url)
        result = deploy_library(redis_url)
        assert result.ok
        assert result.nodes == [
            NodeLoadResult(address, PRIMARY, "unchanged", PACKAGED, PACKAGED)
        ]
        assert result.nodes[0].describe() == f"{address} primary: unchanged {PACKAGED}"

    def test_deploy_older_minor_upgrades(self, redis_url, bare_client, address):
        load_version(bare_client, OLDER_MINOR)
        result = deploy_library(redis_url)
        assert result.ok
        assert result.nodes[0].describe() == (
            f"{address} primary: upgraded {OLDER_MINOR} -> {PACKAGED}"
        )
        assert installed_version(bare_client) == PACKAGED

    def test_deploy_newer_version_is_rejected(self, redis_url, bare_client, address):
        load_version(bare_client, NEWER_PATCH)
        result = deploy_library(redis_url)
        assert not result.ok
        assert result.failed == result.nodes
        assert result.nodes[0].outcome == "rejected"
        assert result.nodes[0].describe() == (
            f"{address} primary: rejected: the server has {NEWER_PATCH}, newer than "
            f"this package's {PACKAGED}; pass --force to downgrade it"
        )
        assert installed_version(bare_client) == NEWER_PATCH

    def test_deploy_newer_version_with_force_downgrades(
        self, redis_url, bare_client, address
    ):
        load_version(bare_client, NEWER_MAJOR)
        result = deploy_library(redis_url, force=True)
        assert result.ok
        assert result.nodes[0].describe() == (
            f"{address} primary: downgraded {NEWER_MAJOR} -> {PACKAGED}"
        )
        assert installed_version(bare_client) == PACKAGED

    def test_deploy_older_major_is_rejected(self, redis_url, bare_client):
        load_version(bare_client, OLDER_MAJOR)
        result = deploy_library(redis_url)
        assert result.nodes[0].outcome == "rejected"
        assert "changes the major version" in result.nodes[0].error
        assert installed_version(bare_client) == OLDER_MAJOR

    def test_deploy_older_major_with_force_upgrades(
        self, redis_url, bare_client, address
    ):
        load_version(bare_client, OLDER_MAJOR)
        result = deploy_library(redis_url, force=True)
        assert result.nodes[0].describe() == (
            f"{address} primary: upgraded {OLDER_MAJOR} -> {PACKAGED}"
        )
        assert installed_version(bare_client) == PACKAGED

    def test_deploy_unversioned_library_is_rejected(self, redis_url, bare_client):
        bare_client.function_load(UNVERSIONED_SOURCE)
        result = deploy_library(redis_url)
        assert result.nodes[0].outcome == "rejected"
        assert result.nodes[0].before == UNKNOWN_VERSION
        [library] = bare_client.function_list(library="concurrent_runs")
        functions = library[library.index(b"functions") + 1]
        assert [function[1] for function in functions] == [b"runs_count"]

    def test_deploy_unversioned_library_with_force_replaces(
        self, redis_url, bare_client, address
    ):
        bare_client.function_load(UNVERSIONED_SOURCE)
        result = deploy_library(redis_url, force=True)
        assert result.nodes[0].describe() == (
            f"{address} primary: replaced {UNKNOWN_VERSION} -> {PACKAGED}"
        )
        assert installed_version(bare_client) == PACKAGED

    def test_deploy_same_version_with_force_reloads(
        self, redis_url, bare_client, address
    ):
        load_version(bare_client, PACKAGED)
        result = deploy_library(redis_url, force=True)
        assert result.nodes[0].describe() == f"{address} primary: reloaded {PACKAGED}"

    def test_deploy_dry_run_on_empty_server_changes_nothing(
        self, redis_url, bare_client, address
    ):
        result = deploy_library(redis_url, dry_run=True)
        assert result.ok
        assert result.dry_run
        assert result.nodes[0].describe() == (
            f"{address} primary: would install {PACKAGED}"
        )
        assert bare_client.function_list() == []

    def test_deploy_dry_run_on_older_version_changes_nothing(
        self, redis_url, bare_client, address
    ):
        load_version(bare_client, OLDER_MINOR)
        result = deploy_library(redis_url, dry_run=True)
        assert result.nodes[0].describe() == (
            f"{address} primary: would upgrade {OLDER_MINOR} -> {PACKAGED}"
        )
        assert installed_version(bare_client) == OLDER_MINOR

    def test_deploy_dry_run_still_rejects_downgrade(self, redis_url, bare_client):
        load_version(bare_client, NEWER_PATCH)
        result = deploy_library(redis_url, dry_run=True, force=False)
        assert not result.ok
        assert installed_version(bare_client) == NEWER_PATCH

    def test_deploy_unreachable_server_raises(self):
        port = free_port()
        with pytest.raises(LoaderError) as caught:
            deploy_library(f"redis://127.0.0.1:{port}/0")
        message = str(caught.value)
        assert message.startswith(
            f"Could not connect: Redis at 127.0.0.1:{port} is unreachable ("
        )
        assert "\n" not in message

    def test_deploy_invalid_url_raises(self):
        with pytest.raises(LoaderError) as caught:
            deploy_library("http://127.0.0.1:6379")
        assert str(caught.value).startswith("Invalid Redis URL in --url: ")


class TestLibraryStatus:
    def test_status_empty_server_has_no_library(self, redis_url, bare_client, address):
        redis_version = bare_client.info("server")["redis_version"]
        assert library_status(redis_url) == [
            NodeStatus(address, PRIMARY, redis_version, None, PACKAGED)
        ]

    def test_status_reports_installed_version(self, redis_url, bare_client, address):
        load_version(bare_client, OLDER_MINOR)
        [node] = library_status(redis_url)
        assert node.library_version == OLDER_MINOR
        assert node.packaged_version == PACKAGED
        assert node.error is None

    def test_status_to_dict_has_json_keys(self, redis_url, bare_client, address):
        [node] = library_status(redis_url)
        assert node.to_dict() == {
            "address": address,
            "role": "primary",
            "redis_version": bare_client.info("server")["redis_version"],
            "library_version": None,
            "packaged_version": PACKAGED,
            "error": None,
        }


class TestSlotAdmin:
    def test_admin_counts_and_lists_live_slots(self, redis_url, loaded_client, key):
        redis_key = "concurrent_runs:" + key
        loaded_client.fcall("runs_acquire", 1, redis_key, 3, 30000, "first")
        loaded_client.fcall("runs_acquire", 1, redis_key, 3, 60000, "second")
        with SlotAdmin(redis_url) as admin:
            assert admin.count(redis_key) == 2
            holders = admin.holders(redis_key)
        assert [holder.token for holder in holders] == ["first", "second"]
        assert 0 < holders[0].seconds_left <= 30
        assert 30 < holders[1].seconds_left <= 60

    def test_admin_reap_loops_over_full_batches(self, redis_url, loaded_client, key):
        redis_key = "concurrent_runs:" + key
        loaded_client.fcall("runs_acquire", 1, redis_key, 3, 60000, "live")
        add_ended_slots(loaded_client, redis_key, 1234)
        with SlotAdmin(redis_url) as admin:
            assert admin.reap(redis_key) == 1234
            assert admin.count(redis_key) == 1
        assert loaded_client.zcard(redis_key) == 1

    def test_admin_reap_exactly_one_batch(self, redis_url, loaded_client, key):
        redis_key = "concurrent_runs:" + key
        add_ended_slots(loaded_client, redis_key, 500)
        with SlotAdmin(redis_url) as admin:
            assert admin.reap(redis_key) == 500
        assert loaded_client.exists(redis_key) == 0

    def test_admin_without_library_names_load(
        self, redis_url, bare_client, key, address
    ):
        with SlotAdmin(redis_url) as admin, pytest.raises(LoaderError) as caught:
            admin.count("concurrent_runs:" + key)
        assert str(caught.value) == (
            f"Could not run runs_count on key 'concurrent_runs:{key}': the "
            f"concurrent_runs library is not loaded on {address}; run "
            "`concurrent-runs load`"
        )

    def test_admin_wrong_type_raises(self, redis_url, loaded_client, key):
        redis_key = "concurrent_runs:" + key
        loaded_client.set(redis_key, "not a sorted set")
        with SlotAdmin(redis_url) as admin, pytest.raises(LoaderError) as caught:
            admin.release(redis_key, "token")
        assert "the key holds another type of value" in str(caught.value)
        assert loaded_client.get(redis_key) == b"not a sorted set"
