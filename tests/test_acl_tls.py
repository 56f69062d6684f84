"""Least privilege (ACL users) and transport (password logins, TLS)."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis
from click.testing import CliRunner

from concurrent_runs import (
    ConcurrentRunsError,
    ConcurrentRunsLimiter,
    LibraryLoadError,
    packaged_version,
)
from concurrent_runs.library import library_source
from concurrent_runs_loader.cli import main as loader_main

from servers import LOCALHOST, RedisServer, TlsFiles

APP_USER = "concurrent-runs-app"
DEPLOY_USER = "concurrent-runs-deploy"

# The application user may call the library's functions on the limiter's keys
# and channels, send redis-py's connection handshake, and subscribe to sharded
# channels while waiting. It also needs each data command that the functions
# run, because Redis checks those against the caller's ACL too.
APP_ACL_SETUSER = (
    "ACL SETUSER concurrent-runs-app reset on >{password} "
    "~concurrent_runs:* &concurrent_runs:* "
    "+fcall +fcall_ro +ssubscribe +sunsubscribe "
    "+hello +auth +client|setname +ping "
    "+time +zscore +zadd +zrem +zcard +zcount +zrank +zrangebyscore +zrevrangebyscore "
    "+pexpireat +pexpiretime +spublish"
)
# The deploy user: loads, lists and deletes the library, reads INFO (server
# version, replication, cluster mode) and the library version, and lists a
# cluster's nodes. It reaches no key.
DEPLOY_ACL_SETUSER = (
    "ACL SETUSER concurrent-runs-deploy reset on >{password} "
    "+hello +auth +client|setname +ping "
    "+function|load +function|list +function|delete +info +fcall_ro +cluster|nodes"
)
# redis-py sends CLIENT SETINFO on connect and ignores its error. Redis 7.2
# added the command, so from 7.2 on both lines grant it, while Redis 7.0
# rejects the rule as an unknown command.
CLIENT_SETINFO_RULE = "+client|setinfo"

# Commands the application user gets that are not data commands of the library.
APP_CALL_AND_CONNECTION_COMMANDS = {
    "fcall", "fcall_ro", "ssubscribe", "sunsubscribe",
    "hello", "auth", "client|setinfo", "client|setname", "ping",
}
FORBIDDEN_TO_APP = [
    ("FUNCTION", "LOAD", library_source()),
    ("FUNCTION", "FLUSH"),
    ("FLUSHALL",),
    ("KEYS", "*"),
    ("CONFIG", "GET", "maxmemory"),
    ("SET", "concurrent_runs:x", "1"),
]
APP_PASSWORD = "app-" + uuid.uuid4().hex
DEPLOY_PASSWORD = "deploy-" + uuid.uuid4().hex
LUA_CALL = re.compile(r"\bcall\('([A-Za-z]+)'")


def allowed_commands(setuser_line: str) -> set[str]:
    return {rule[1:].lower() for rule in setuser_line.split() if rule.startswith("+")}


def create_users(admin: redis.Redis) -> None:
    version = tuple(int(part) for part in admin.info("server")["redis_version"].split("."))
    for line, password in (
        (APP_ACL_SETUSER, APP_PASSWORD),
        (DEPLOY_ACL_SETUSER, DEPLOY_PASSWORD),
    ):
        if version >= (7, 2):
            line += " " + CLIENT_SETINFO_RULE
        assert admin.execute_command(*line.format(password=password).split()) == b"OK"


def user_url(server: RedisServer, user: str, password: str) -> str:
    scheme = "rediss" if server.tls else "redis"
    return f"{scheme}://{user}:{password}@{LOCALHOST}:{server.port}/0"


def acl_denials(admin: redis.Redis) -> list[str]:
    """Return what ACL LOG recorded: every command or key the server denied."""
    return [f"{entry['username']}: {entry['object']} ({entry['reason']})"
            for entry in admin.acl_log()]


def run_loader(*args: str) -> object:
    runner = CliRunner(env={"CONCURRENT_RUNS_REDIS_URL": None, "REDIS_URL": None})
    return runner.invoke(loader_main, list(args), catch_exceptions=False)


def exercise_limiter(limiter: ConcurrentRunsLimiter, key: str) -> None:
    """Acquire, wait, extend, count, list and release, asserting each reply."""
    first = limiter.acquire(key, 1)
    assert first is not None
    assert limiter.get_count(key) == 1
    assert list(limiter.get_holders(key)) == [first]
    assert limiter.extend(key, first, 30) is True

    # A waiter is woken by the release's message on the sharded channel.
    releaser = threading.Timer(0.2, limiter.release, args=(key, first))
    releaser.start()
    second = limiter.acquire(key, 1, wait=10)
    releaser.join()
    assert second is not None
    assert limiter.release(key, second) is True
    assert limiter.get_count(key) == 0

    with limiter.slot(key, 1, renew=True) as token:
        assert list(limiter.get_holders(key)) == [token]
    assert limiter.get_count(key) == 0


# The ACL lines against the library source -----------------------------------


def test_app_acl_data_commands_match_library_calls():
    library_calls = {name.lower() for name in LUA_CALL.findall(library_source())}
    data_commands = allowed_commands(APP_ACL_SETUSER) - APP_CALL_AND_CONNECTION_COMMANDS

    assert library_calls, "no call('X' site found in the library source"
    assert data_commands == library_calls


def test_readme_acl_lines_match_tested_ones():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")

    assert APP_ACL_SETUSER.format(password="APP_PASSWORD") in readme
    assert DEPLOY_ACL_SETUSER.format(password="DEPLOY_PASSWORD") in readme


def test_app_acl_grants_no_admin_commands():
    granted = allowed_commands(APP_ACL_SETUSER)

    for command in ("function", "function|load", "flushall", "flushdb", "keys",
                    "config", "eval", "script", "info", "acl"):
        assert command not in granted
    assert not any(rule.startswith("+@") for rule in APP_ACL_SETUSER.split())


def test_deploy_acl_grants_no_key_or_data_command():
    rules = DEPLOY_ACL_SETUSER.split()

    assert not any(rule.startswith(("~", "%", "&", "+@")) for rule in rules)
    assert "+fcall" not in rules


# Users on a real server --------------------------------------------------------


@pytest.fixture
def acl_server(server_folder: Path) -> Iterator[tuple[RedisServer, redis.Redis]]:
    with RedisServer(server_folder) as server:
        admin = server.client()
        create_users(admin)
        admin.function_load(library_source())
        admin.acl_log_reset()
        yield server, admin
        admin.close()


class TestApplicationUser:
    def test_app_user_runs_whole_wrapper_without_denials(self, acl_server):
        server, admin = acl_server
        url = user_url(server, APP_USER, APP_PASSWORD)

        with ConcurrentRunsLimiter(url, slot_timeout=2) as limiter:
            exercise_limiter(limiter, "acl-key")

        assert acl_denials(admin) == []

    def test_app_user_admin_commands_rejected(self, acl_server):
        server, _admin = acl_server
        app = server.client(username=APP_USER, password=APP_PASSWORD)

        for command in FORBIDDEN_TO_APP:
            with pytest.raises(redis.exceptions.NoPermissionError):
                app.execute_command(*command)
        app.close()

    def test_app_user_other_keys_rejected(self, acl_server):
        server, _admin = acl_server
        app = server.client(username=APP_USER, password=APP_PASSWORD)

        with pytest.raises(redis.exceptions.NoPermissionError):
            app.fcall("runs_acquire", 1, "other:key", 1, 1000, "token")
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.fcall_ro("runs_count", 1, "other:key")
        app.close()

    def test_app_user_missing_library_raises_load_error(self, acl_server):
        server, admin = acl_server
        admin.function_flush()
        url = user_url(server, APP_USER, APP_PASSWORD)

        with ConcurrentRunsLimiter(url) as limiter:
            with pytest.raises(LibraryLoadError) as raised:
                limiter.acquire("acl-key", 1)

        message = str(raised.value)
        assert "run `concurrent-runs load` as a deploy user" in message
        assert "FUNCTION LOAD" in message
        assert admin.function_list() == []


class TestDeployUser:
    def test_deploy_user_loads_library_without_denials(self, acl_server):
        server, admin = acl_server
        admin.function_flush()
        url = user_url(server, DEPLOY_USER, DEPLOY_PASSWORD)

        loaded = run_loader("load", "--url", url)
        status = run_loader("status", "--url", url)

        assert loaded.exit_code == 0, loaded.stderr
        assert loaded.stdout == f"{server.address} primary: installed {packaged_version()}\n"
        assert status.exit_code == 0, status.stderr
        assert packaged_version() in status.stdout
        assert acl_denials(admin) == []

    def test_deploy_user_reaches_no_key(self, acl_server):
        server, _admin = acl_server
        deploy = server.client(username=DEPLOY_USER, password=DEPLOY_PASSWORD)

        assert deploy.fcall_ro("runs_version", 0) == packaged_version().encode()
        with pytest.raises(redis.exceptions.NoPermissionError):
            deploy.fcall_ro("runs_count", 1, "concurrent_runs:x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            deploy.fcall("runs_acquire", 1, "concurrent_runs:x", 1, 1000, "token")
        with pytest.raises(redis.exceptions.NoPermissionError):
            deploy.flushall()
        deploy.close()


# Tokens only free their own slot ---------------------------------------------


def test_token_of_other_key_frees_nothing(limiter, key):
    other_key = key + "-other"
    token = limiter.acquire(key, 1)
    other_token = limiter.acquire(other_key, 1)

    assert limiter.release(other_key, token) is False
    assert limiter.extend(other_key, token, 60) is False
    assert limiter.release(key, other_token) is False
    assert limiter.extend(key, other_token, 60) is False
    assert list(limiter.get_holders(key)) == [token]
    assert list(limiter.get_holders(other_key)) == [other_token]


def test_guessed_tokens_free_nothing(limiter, key):
    token = limiter.acquire(key, 1)
    guesses = [uuid.uuid4().hex, token[:-1] + ("0" if token[-1] != "0" else "1"),
               token.upper(), token + " ", " " + token, token[:16]]

    for guess in guesses:
        assert limiter.release(key, guess) is False
        assert limiter.extend(key, guess, 60) is False
    assert list(limiter.get_holders(key)) == [token]
    assert limiter.release(key, token) is True


# Password logins and TLS --------------------------------------------------------


def test_wrong_password_is_reported_as_login_failure(acl_server):
    server, _admin = acl_server
    url = user_url(server, APP_USER, "wrong-password")

    for fail_open in (False, True):
        with ConcurrentRunsLimiter(url, fail_open=fail_open, socket_timeout=1) as limiter:
            with pytest.raises(ConcurrentRunsError) as raised:
                limiter.acquire("acl-key", 1)
        message = str(raised.value)
        assert "rejected the login" in message
        assert "user name and password" in message


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the TLS tests need the openssl command (Debian: apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["req", "-x509", *ec_key, "-keyout", "ca.key", "-out", "ca.crt",
         "-subj", "/CN=concurrent-runs test CA", "-days", "2"],
        ["req", *ec_key, "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf"],
    ]
    (folder / "san.cnf").write_text(f"subjectAltName=IP:{LOCALHOST}\n")
    for step in steps:
        subprocess.run([openssl, *step], cwd=folder, check=True, capture_output=True)
    return TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")


@pytest.fixture
def tls_server(server_folder: Path, tls_files: TlsFiles) -> Iterator[RedisServer]:
    with RedisServer(server_folder, tls=tls_files) as server:
        admin = server.client()
        create_users(admin)
        admin.close()
        yield server


class TestTls:
    def test_plain_connection_to_tls_port_fails(self, tls_server):
        plain = redis.Redis(host=LOCALHOST, port=tls_server.port, socket_timeout=1)

        with pytest.raises(redis.exceptions.ConnectionError):
            plain.ping()
        plain.close()

    def test_loader_and_wrapper_over_tls_url(self, tls_server, tls_files):
        ca_query = f"?ssl_ca_certs={tls_files.ca_cert}"
        deploy_url = user_url(tls_server, DEPLOY_USER, DEPLOY_PASSWORD) + ca_query
        app_url = user_url(tls_server, APP_USER, APP_PASSWORD) + ca_query

        loaded = run_loader("load", "--url", deploy_url)
        assert loaded.exit_code == 0, loaded.stderr
        assert loaded.stdout.endswith(f"installed {packaged_version()}\n")
        with ConcurrentRunsLimiter(app_url, slot_timeout=2) as limiter:
            exercise_limiter(limiter, "tls-key")

    def test_wrapper_over_tls_client(self, tls_server, tls_files):
        admin = tls_server.client()
        admin.function_load(library_source())
        client = redis.Redis(
            host=LOCALHOST,
            port=tls_server.port,
            username=APP_USER,
            password=APP_PASSWORD,
            ssl=True,
            ssl_ca_certs=str(tls_files.ca_cert),
            socket_timeout=5,
        )

        limiter = ConcurrentRunsLimiter(client=client, slot_timeout=2)
        exercise_limiter(limiter, "tls-client-key")

        assert acl_denials(admin) == []
        client.close()
        admin.close()

    def test_untrusted_certificate_is_unavailable(self, tls_server):
        # Without the test CA, the server's certificate cannot be verified.
        url = user_url(tls_server, APP_USER, APP_PASSWORD)

        with ConcurrentRunsLimiter(url, socket_timeout=1) as limiter:
            with pytest.raises(ConcurrentRunsError, match="certificate"):
                limiter.acquire("tls-key", 1)
