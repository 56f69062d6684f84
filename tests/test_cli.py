"""The concurrent-runs command, run through click's CliRunner against real servers."""

from __future__ import annotations

import json
import logging
import re
from typing import Iterator

import pytest
import redis
from click.testing import CliRunner, Result

from concurrent_runs_loader.cli import main

from loader_support import (
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
from servers import LOCALHOST, RedisServer, free_port

COMMANDS = ["load", "status", "count", "holders", "release", "reap"]
# Environment of every run: no URL from the environment unless a test sets one.
NO_URL_ENV = {"CONCURRENT_RUNS_REDIS_URL": None, "REDIS_URL": None}


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    runner = CliRunner(env={**NO_URL_ENV, **(env or {})})
    return runner.invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def bare_client(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """A client of the shared server, with no keys and no functions loaded."""
    redis_client.function_flush()
    yield redis_client
    redis_client.function_flush()


@pytest.fixture
def address(redis_url: str) -> str:
    return address_of(redis_url)


@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server of this module's own that requires the password 'secret'."""
    folder = tmp_path_factory.mktemp("password")
    with RedisServer(folder, extra_args=["--requirepass", "secret"]) as server:
        yield server


def acquire(client: redis.Redis, key: str, token: str, timeout_ms: int = 60000) -> None:
    redis_key = "concurrent_runs:" + key
    assert client.fcall("runs_acquire", 1, redis_key, 3, timeout_ms, token) == 1


class TestLoadCommand:
    def test_load_empty_server_installs(self, redis_url, bare_client, address):
        result = run("load", "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == f"{address} primary: installed {PACKAGED}\n"
        assert result.stderr == ""
        assert installed_version(bare_client) == PACKAGED

    def test_load_twice_reports_unchanged(self, redis_url, bare_client, address):
        run("load", "--url", redis_url)
        result = run("load", "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == f"{address} primary: unchanged {PACKAGED}\n"

    def test_load_older_version_upgrades(self, redis_url, bare_client, address):
        load_version(bare_client, OLDER_MINOR)
        result = run("load", "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == (
            f"{address} primary: upgraded {OLDER_MINOR} -> {PACKAGED}\n"
        )
        assert installed_version(bare_client) == PACKAGED

    def test_load_newer_version_is_rejected(self, redis_url, bare_client, address):
        load_version(bare_client, NEWER_PATCH)
        result = run("load", "--url", redis_url)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr == (
            f"{address} primary: rejected: the server has {NEWER_PATCH}, newer than "
            f"this package's {PACKAGED}; pass --force to downgrade it\n"
        )
        assert installed_version(bare_client) == NEWER_PATCH

    def test_load_newer_version_with_force_downgrades(
        self, redis_url, bare_client, address
    ):
        load_version(bare_client, NEWER_PATCH)
        result = run("load", "--url", redis_url, "--force")
        assert result.exit_code == 0
        assert result.stdout == (
            f"{address} primary: downgraded {NEWER_PATCH} -> {PACKAGED}\n"
        )
        assert installed_version(bare_client) == PACKAGED

    def test_load_older_major_needs_force(self, redis_url, bare_client, address):
        load_version(bare_client, OLDER_MAJOR)
        rejected = run("load", "--url", redis_url)
        assert rejected.exit_code == 1
        assert "changes the major version" in rejected.stderr
        assert installed_version(bare_client) == OLDER_MAJOR

        forced = run("load", "--url", redis_url, "--force")
        assert forced.exit_code == 0
        assert forced.stdout == (
            f"{address} primary: upgraded {OLDER_MAJOR} -> {PACKAGED}\n"
        )

    def test_load_unversioned_library_needs_force(
        self, redis_url, bare_client, address
    ):
        bare_client.function_load(UNVERSIONED_SOURCE)
        rejected = run("load", "--url", redis_url)
        assert rejected.exit_code == 1
        assert rejected.stderr == (
            f"{address} primary: rejected: the server has a concurrent_runs library "
            "of unrecognised version 'unknown'; pass --force to replace it\n"
        )
        forced = run("load", "--url", redis_url, "--force")
        assert forced.stdout == f"{address} primary: replaced unknown -> {PACKAGED}\n"

    def test_load_dry_run_on_empty_server_changes_nothing(
        self, redis_url, bare_client, address
    ):
        result = run("load", "--url", redis_url, "--dry-run")
        assert result.exit_code == 0
        assert result.stdout == f"{address} primary: would install {PACKAGED}\n"
        assert bare_client.function_list() == []

    def test_load_dry_run_on_older_version_changes_nothing(
        self, redis_url, bare_client, address
    ):
        load_version(bare_client, OLDER_MINOR)
        result = run("load", "--url", redis_url, "--dry-run")
        assert result.exit_code == 0
        assert result.stdout == (
            f"{address} primary: would upgrade {OLDER_MINOR} -> {PACKAGED}\n"
        )
        assert installed_version(bare_client) == OLDER_MINOR

    def test_load_dry_run_with_force_changes_nothing(
        self, redis_url, bare_client, address
    ):
        load_version(bare_client, NEWER_PATCH)
        result = run("load", "--url", redis_url, "--dry-run", "--force")
        assert result.exit_code == 0
        assert result.stdout == (
            f"{address} primary: would downgrade {NEWER_PATCH} -> {PACKAGED}\n"
        )
        assert installed_version(bare_client) == NEWER_PATCH

    def test_load_dry_run_reports_rejection(self, redis_url, bare_client):
        load_version(bare_client, NEWER_PATCH)
        result = run("load", "--url", redis_url, "--dry-run")
        assert result.exit_code == 1
        assert "rejected: the server has" in result.stderr

    def test_load_verbose_logs_the_change(self, redis_url, bare_client, address):
        loader_logger = logging.getLogger("concurrent_runs_loader")
        handlers_before = list(loader_logger.handlers)
        result = run("-v", "load", "--url", redis_url)
        assert result.exit_code == 0
        assert (
            f"INFO concurrent_runs_loader.deploy: {address} primary: installed "
            f"{PACKAGED}\n"
        ) in result.stderr
        assert loader_logger.handlers == handlers_before

    def test_load_unreachable_server_fails(self):
        port = free_port()
        result = run("load", "--url", f"redis://{LOCALHOST}:{port}/0")
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr.startswith(
            f"Error: Could not connect: Redis at {LOCALHOST}:{port} is unreachable ("
        )
        assert result.stderr.count("\n") == 1

    def test_load_without_password_fails(self, password_server):
        result = run("load", "--url", password_server.url)
        assert result.exit_code == 1
        assert result.stderr == (
            f"Error: Could not connect: Redis at {password_server.address} requires "
            "a login, but --url has no password; use "
            "redis://USER:PASSWORD@HOST:PORT/DB\n"
        )

    def test_load_wrong_password_fails(self, password_server):
        url = f"redis://:wrong@{password_server.address}/0"
        result = run("load", "--url", url)
        assert result.exit_code == 1
        assert result.stderr.startswith(
            f"Error: Could not connect: Redis at {password_server.address} rejected "
            "the login ("
        )
        assert result.stderr.endswith("check the user name and password in --url\n")
        assert "wrong" not in result.stderr

    def test_load_right_password_installs(self, password_server):
        with password_server.client(password="secret") as admin:
            admin.function_flush()
        url = f"redis://:secret@{password_server.address}/0"
        result = run("load", "--url", url)
        assert result.exit_code == 0
        assert result.stdout == (
            f"{password_server.address} primary: installed {PACKAGED}\n"
        )

    def test_load_without_function_permission_fails(self, password_server):
        with password_server.client(password="secret") as admin:
            admin.function_flush()
            admin.acl_setuser(
                "reader", enabled=True, passwords=["+pw"], keys=["*"],
                commands=["+info", "+fcall_ro", "+function|list"],
            )
        url = f"redis://reader:pw@{password_server.address}/0"
        result = run("load", "--url", url)
        assert result.exit_code == 1
        assert result.stderr.startswith(
            f"{password_server.address} primary: failed: Could not load the library: "
            f"the Redis user lacks a permission on {password_server.address} ("
        )

    def test_load_with_deploy_acl_installs(self, password_server):
        with password_server.client(password="secret") as admin:
            admin.function_flush()
            admin.acl_setuser(
                "deployer", enabled=True, passwords=["+pw"],
                commands=["+info", "+fcall_ro", "+function|list", "+function|load"],
            )
        url = f"redis://deployer:pw@{password_server.address}/0"
        loaded = run("load", "--url", url)
        assert loaded.exit_code == 0
        assert loaded.stdout == (
            f"{password_server.address} primary: installed {PACKAGED}\n"
        )
        status = run("status", "--url", url, "--json")
        assert status.exit_code == 0
        assert json.loads(status.stdout)[0]["library_version"] == PACKAGED

    def test_load_invalid_url_fails(self):
        result = run("load", "--url", "http://127.0.0.1:6379")
        assert result.exit_code == 1
        assert result.stderr == (
            "Error: Invalid Redis URL in --url: Redis URL must specify one of the "
            "following schemes (redis://, rediss://, unix://)\n"
        )

    def test_load_prefers_concurrent_runs_env(self, redis_url, bare_client, address):
        unreachable = f"redis://{LOCALHOST}:{free_port()}/0"
        env = {"CONCURRENT_RUNS_REDIS_URL": redis_url, "REDIS_URL": unreachable}
        result = run("load", env=env)
        assert result.exit_code == 0
        assert result.stdout == f"{address} primary: installed {PACKAGED}\n"

    def test_load_falls_back_to_redis_url_env(self, redis_url, bare_client, address):
        result = run("load", env={"REDIS_URL": redis_url})
        assert result.exit_code == 0
        assert result.stdout == f"{address} primary: installed {PACKAGED}\n"


class TestStatusCommand:
    def status_table(self, address: str, redis_version: str, library: str) -> str:
        address_header = "ADDRESS".ljust(len(address))
        redis_width = max(len("REDIS"), len(redis_version))
        return (
            f"{address_header}  ROLE     {'REDIS'.ljust(redis_width)}  LIBRARY\n"
            f"{address}  primary  {redis_version.ljust(redis_width)}  {library}\n"
            f"packaged library: {PACKAGED}\n"
        )

    def test_status_empty_server_shows_none(self, redis_url, bare_client, address):
        redis_version = bare_client.info("server")["redis_version"]
        result = run("status", "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == self.status_table(address, redis_version, "none")
        assert result.stderr == ""

    def test_status_shows_installed_version(self, redis_url, bare_client, address):
        load_version(bare_client, OLDER_MINOR)
        redis_version = bare_client.info("server")["redis_version"]
        result = run("status", "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == self.status_table(address, redis_version, OLDER_MINOR)

    def test_status_json_is_list_of_nodes(self, redis_url, bare_client, address):
        run("load", "--url", redis_url)
        result = run("status", "--url", redis_url, "--json")
        assert result.exit_code == 0
        assert json.loads(result.stdout) == [
            {
                "address": address,
                "role": "primary",
                "redis_version": bare_client.info("server")["redis_version"],
                "library_version": PACKAGED,
                "packaged_version": PACKAGED,
                "error": None,
            }
        ]

    def test_status_json_without_library_has_null(self, redis_url, bare_client):
        result = run("status", "--url", redis_url, "--json")
        [node] = json.loads(result.stdout)
        assert node["library_version"] is None

    def test_status_unreachable_server_fails(self):
        port = free_port()
        result = run("status", "--url", f"redis://{LOCALHOST}:{port}/0")
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr.startswith("Error: Could not connect: Redis at ")
        assert result.stderr.count("\n") == 1


class TestCountCommand:
    def test_count_live_slots(self, redis_url, loaded_client, key):
        acquire(loaded_client, key, "first")
        acquire(loaded_client, key, "second")
        result = run("count", key, "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == "2\n"

    def test_count_unknown_key_is_zero(self, redis_url, loaded_client, key):
        result = run("count", key, "--url", redis_url)
        assert result.stdout == "0\n"

    def test_count_uses_prefix(self, redis_url, loaded_client, key):
        loaded_client.fcall("runs_acquire", 1, "jobs/" + key, 3, 60000, "token")
        assert run("count", key, "--url", redis_url).stdout == "0\n"
        prefixed = run("count", key, "--url", redis_url, "--prefix", "jobs/")
        assert prefixed.stdout == "1\n"

    def test_count_wrong_type_fails(self, redis_url, loaded_client, key):
        loaded_client.set("concurrent_runs:" + key, "text")
        result = run("count", key, "--url", redis_url)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr == (
            f"Error: Could not run runs_count on key 'concurrent_runs:{key}': the key "
            "holds another type of value, not a concurrent_runs sorted set; check "
            "KEY and --prefix\n"
        )

    def test_count_without_library_names_load(
        self, redis_url, bare_client, key, address
    ):
        result = run("count", key, "--url", redis_url)
        assert result.exit_code == 1
        assert result.stderr == (
            f"Error: Could not run runs_count on key 'concurrent_runs:{key}': the "
            f"concurrent_runs library is not loaded on {address}; run "
            "`concurrent-runs load`\n"
        )

    def test_count_empty_key_is_usage_error(self, redis_url):
        result = run("count", "", "--url", redis_url)
        assert result.exit_code == 2
        assert "Invalid value for 'KEY': must not be empty" in result.stderr

    def test_count_unreachable_server_fails(self, key):
        port = free_port()
        result = run("count", key, "--url", f"redis://{LOCALHOST}:{port}/0")
        assert result.exit_code == 1
        assert result.stderr.startswith(
            f"Error: Could not connect: Redis at {LOCALHOST}:{port} is unreachable ("
        )


class TestHoldersCommand:
    def test_holders_lists_soonest_end_first(self, redis_url, loaded_client, key):
        acquire(loaded_client, key, "later", timeout_ms=60000)
        acquire(loaded_client, key, "sooner", timeout_ms=30000)
        result = run("holders", key, "--url", redis_url)
        assert result.exit_code == 0
        lines = result.stdout.splitlines()
        assert len(lines) == 2
        sooner = re.fullmatch(r"sooner (\d+\.\d{3})s", lines[0])
        later = re.fullmatch(r"later (\d+\.\d{3})s", lines[1])
        assert sooner is not None
        assert later is not None
        assert 0 < float(sooner.group(1)) <= 30
        assert 30 < float(later.group(1)) <= 60

    def test_holders_json_lists_objects(self, redis_url, loaded_client, key):
        acquire(loaded_client, key, "only", timeout_ms=60000)
        result = run("holders", key, "--url", redis_url, "--json")
        assert result.exit_code == 0
        [holder] = json.loads(result.stdout)
        assert set(holder) == {"token", "seconds_left"}
        assert holder["token"] == "only"
        assert 0 < holder["seconds_left"] <= 60

    def test_holders_json_without_slots_is_empty(self, redis_url, loaded_client, key):
        result = run("holders", key, "--url", redis_url, "--json")
        assert result.exit_code == 0
        assert json.loads(result.stdout) == []

    def test_holders_without_slots_writes_stderr(self, redis_url, loaded_client, key):
        result = run("holders", key, "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == ""
        assert result.stderr == f"no live slots at concurrent_runs:{key}\n"

    def test_holders_skips_ended_slots(self, redis_url, loaded_client, key):
        acquire(loaded_client, key, "live")
        add_ended_slots(loaded_client, "concurrent_runs:" + key, 3)
        result = run("holders", key, "--url", redis_url, "--json")
        assert [holder["token"] for holder in json.loads(result.stdout)] == ["live"]

    def test_holders_wrong_type_fails(self, redis_url, loaded_client, key):
        loaded_client.rpush("concurrent_runs:" + key, "item")
        result = run("holders", key, "--url", redis_url)
        assert result.exit_code == 1
        assert "holds another type of value" in result.stderr


class TestReleaseCommand:
    def test_release_held_token_frees_slot(self, redis_url, loaded_client, key):
        acquire(loaded_client, key, "stuck")
        result = run("release", key, "stuck", "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == "released stuck\n"
        assert loaded_client.fcall_ro("runs_count", 1, "concurrent_runs:" + key) == 0

    def test_release_unknown_token_fails(self, redis_url, loaded_client, key):
        acquire(loaded_client, key, "holder")
        result = run("release", key, "stranger", "--url", redis_url)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr == (
            "Error: Could not release token stranger: it has no live slot at "
            f"concurrent_runs:{key}\n"
        )
        assert loaded_client.fcall_ro("runs_count", 1, "concurrent_runs:" + key) == 1

    def test_release_too_long_token_is_usage_error(self, redis_url, loaded_client, key):
        result = run("release", key, "t" * 257, "--url", redis_url)
        assert result.exit_code == 2
        expected = "Invalid value for 'TOKEN': token must be 1 to 256 bytes"
        assert expected in result.stderr

    def test_release_wrong_type_fails(self, redis_url, loaded_client, key):
        loaded_client.set("concurrent_runs:" + key, "text")
        result = run("release", key, "token", "--url", redis_url)
        assert result.exit_code == 1
        assert "holds another type of value" in result.stderr
        assert loaded_client.get("concurrent_runs:" + key) == b"text"


class TestReapCommand:
    def test_reap_removes_ended_slots_only(self, redis_url, loaded_client, key):
        acquire(loaded_client, key, "live")
        add_ended_slots(loaded_client, "concurrent_runs:" + key, 2)
        result = run("reap", key, "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == f"removed 2 ended slots from concurrent_runs:{key}\n"
        assert loaded_client.zrange("concurrent_runs:" + key, 0, -1) == [b"live"]

    def test_reap_removes_more_than_one_batch(self, redis_url, loaded_client, key):
        add_ended_slots(loaded_client, "concurrent_runs:" + key, 1001)
        result = run("reap", key, "--url", redis_url)
        assert result.stdout == f"removed 1001 ended slots from concurrent_runs:{key}\n"
        assert loaded_client.exists("concurrent_runs:" + key) == 0

    def test_reap_one_ended_slot_says_slot(self, redis_url, loaded_client, key):
        add_ended_slots(loaded_client, "concurrent_runs:" + key, 1)
        result = run("reap", key, "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == f"removed 1 ended slot from concurrent_runs:{key}\n"

    def test_reap_unknown_key_removes_nothing(self, redis_url, loaded_client, key):
        result = run("reap", key, "--url", redis_url)
        assert result.exit_code == 0
        assert result.stdout == f"removed 0 ended slots from concurrent_runs:{key}\n"

    def test_reap_wrong_type_fails(self, redis_url, loaded_client, key):
        loaded_client.hset("concurrent_runs:" + key, "field", "value")
        result = run("reap", key, "--url", redis_url)
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: Could not run runs_reap on key ")


class TestHelp:
    def test_help_lists_every_command(self):
        result = run("--help")
        assert result.exit_code == 0
        listed = re.findall(r"^  (\w+)  ", result.stdout, flags=re.MULTILINE)
        assert sorted(listed) == sorted(COMMANDS)
        assert "-v, --verbose" in result.stdout

    @pytest.mark.parametrize("command", COMMANDS)
    def test_help_of_each_command(self, command):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert result.stdout.startswith(f"Usage: main {command} [OPTIONS]")
        assert "--url URL" in result.stdout
        assert "CONCURRENT_RUNS_REDIS_URL" in result.stdout
        assert "-h, --help" in result.stdout

    @pytest.mark.parametrize("command", ["count", "holders", "release", "reap"])
    def test_help_of_key_commands_shows_prefix(self, command):
        result = run(command, "-h")
        assert "--prefix TEXT" in result.stdout
        assert "[default: concurrent_runs:]" in result.stdout

    @pytest.mark.parametrize(
        ("command", "option"),
        [
            ("load", "--force"),
            ("load", "--dry-run"),
            ("load", "--replica-timeout SECONDS"),
            ("status", "--json"),
            ("holders", "--json"),
        ],
    )
    def test_help_describes_option(self, command, option):
        result = run(command, "--help")
        lines = result.stdout.splitlines()
        line = next(line for line in lines if line.strip().startswith(option))
        assert len(line.split(option, 1)[1].strip()) > 10
