"""The blocking wrapper, ConcurrentRunsLimiter, against a real Redis server."""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from importlib import resources
from pathlib import Path

import pytest
import redis

import concurrent_runs
import concurrent_runs.client as client_module
from concurrent_runs import (
    ConcurrentRunsError,
    ConcurrentRunsLimiter,
    LibraryVersionError,
    LimiterUnavailableError,
    SlotLimitReachedError,
    acquire_slot,
    get_concurrent_limiter,
)
from concurrent_runs.library import library_source, packaged_version

from servers import RedisServer, free_port

PACKAGE_FOLDER = Path(concurrent_runs.__file__).resolve().parent
PREFIX = "concurrent_runs:"
TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")
ENVIRONMENT_VARIABLES = (
    "CONCURRENT_RUNS_REDIS_URL",
    "REDIS_URL",
    "CONCURRENT_RUNS_SLOT_TIMEOUT",
    "CONCURRENT_RUNS_FAIL_OPEN",
    "CONCURRENT_RUNS_CLUSTER",
)
# Generous upper bound for a call that must fail fast instead of hanging.
NO_HANG_BOUND_S = 30


def unreachable_url() -> str:
    """Return the URL of a 127.0.0.1 port that nothing listens on."""
    return f"redis://127.0.0.1:{free_port()}/0"


def assert_only_package_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Assert that the package logged on its own logger only, never on the root logger.

    redis-py's own records (logger "redis.connection") come from redis-py and
    are left out.
    """
    for record in caplog.records:
        assert record.name != "root", record.getMessage()
        if Path(record.pathname).resolve().is_relative_to(PACKAGE_FOLDER):
            assert record.name == "concurrent_runs", (record.name, record.getMessage())


def package_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "concurrent_runs" and record.levelno == level
    ]


def server_version_source(version: str) -> str:
    """Return the packaged library source with its VERSION line set to `version`."""
    source, replaced = re.subn(
        r"^local VERSION = '[^']*'$",
        f"local VERSION = '{version}'",
        library_source(),
        flags=re.MULTILINE,
    )
    assert replaced == 1
    return source


def fcall_counts(client: redis.Redis) -> tuple[int, int]:
    """Return how many FCALL and FCALL_RO commands the server ran since CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    fcall = stats.get("cmdstat_fcall", {}).get("calls", 0)
    fcall_ro = stats.get("cmdstat_fcall_ro", {}).get("calls", 0)
    return fcall, fcall_ro


def run_with_bound(call, bound_s: float = NO_HANG_BOUND_S):
    """Run `call` in a thread; return what it raised, failing if it did not finish."""
    outcome: dict[str, BaseException | object] = {}

    def target() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(bound_s)
    assert not worker.is_alive(), f"the call still hangs after {bound_s} s"
    return outcome


# acquire, release, extend, get_count, get_holders ------------------------------


def test_acquire_returns_token_until_full(limiter, key):
    first = limiter.acquire(key, 2)
    second = limiter.acquire(key, 2)

    assert first is not None
    assert second is not None
    assert limiter.acquire(key, 2) is None
    assert limiter.get_count(key) == 2


def test_release_frees_slot_and_returns_true(limiter, key):
    token = limiter.acquire(key, 1)

    assert limiter.release(key, token) is True

    assert limiter.get_count(key) == 0
    assert limiter.acquire(key, 1) is not None


def test_release_unknown_token_returns_false(limiter, key):
    limiter.acquire(key, 1)

    assert limiter.release(key, "0" * 32) is False
    assert limiter.get_count(key) == 1


def test_release_twice_returns_false_second_time(limiter, key):
    token = limiter.acquire(key, 1)

    assert limiter.release(key, token) is True
    assert limiter.release(key, token) is False


def test_extend_sets_lease_to_timeout(limiter, key):
    token = limiter.acquire(key, 1)

    assert limiter.extend(key, token, timeout=5) is True
    assert 0 < limiter.get_holders(key)[token] <= 5

    # Without a timeout the lease is slot_timeout (30 s) long again.
    assert limiter.extend(key, token) is True
    assert 5 < limiter.get_holders(key)[token] <= limiter.slot_timeout


def test_extend_unknown_token_returns_false(limiter, key):
    assert limiter.extend(key, "0" * 32) is False


def test_extend_released_slot_returns_false(limiter, key):
    token = limiter.acquire(key, 1)
    limiter.release(key, token)

    assert limiter.extend(key, token) is False
    assert limiter.get_count(key) == 0


def test_ended_lease_frees_slot_and_cannot_be_extended(redis_url, loaded_client, key):
    with ConcurrentRunsLimiter(redis_url, slot_timeout=0.05) as short:
        token = short.acquire(key, 1)
        lease_end_ms = int(loaded_client.zscore(PREFIX + key, token))
        while True:
            seconds, microseconds = loaded_client.time()
            if seconds * 1000 + microseconds // 1000 > lease_end_ms:
                break
            threading.Event().wait(0.01)

        assert short.get_count(key) == 0
        assert short.extend(key, token) is False
        assert short.release(key, token) is False
        assert short.acquire(key, 1) is not None


def test_get_holders_lists_soonest_end_first(limiter, key):
    late = limiter.acquire(key, 3)
    soon = limiter.acquire(key, 3)
    middle = limiter.acquire(key, 3)
    limiter.extend(key, soon, timeout=5)
    limiter.extend(key, middle, timeout=10)

    held = limiter.get_holders(key)

    assert list(held) == [soon, middle, late]
    assert all(isinstance(seconds, float) for seconds in held.values())
    assert 0 < held[soon] <= 5
    assert 5 < held[middle] <= 10
    assert 10 < held[late] <= 30


def test_unused_key_has_no_holders(limiter, key):
    assert limiter.get_holders(key) == {}
    assert limiter.get_count(key) == 0


def test_tokens_are_32_hex_digits_and_unique(limiter, key):
    tokens = [limiter.acquire(key, 200) for _ in range(200)]

    assert all(TOKEN_PATTERN.fullmatch(token) for token in tokens)
    assert len(set(tokens)) == 200
    assert limiter.get_count(key) == 200


def test_client_argument_is_used_as_given(redis_url, loaded_client, key):
    given = redis.Redis.from_url(redis_url)
    with ConcurrentRunsLimiter(client=given) as limiter:
        assert limiter.client is given

        token = limiter.acquire(key, 1)

    assert loaded_client.zscore(PREFIX + key, token) is not None


# Key prefix --------------------------------------------------------------------


def test_redis_key_is_default_prefix_plus_key(limiter, loaded_client, key):
    token = limiter.acquire(key, 1)

    assert limiter.key_prefix == PREFIX
    assert loaded_client.zscore(PREFIX + key, token) is not None
    assert loaded_client.exists(key) == 0


def test_custom_prefix_names_redis_key(redis_url, loaded_client, key):
    with ConcurrentRunsLimiter(redis_url, key_prefix="myapp:limits:") as custom:
        token = custom.acquire(key, 1)

    assert loaded_client.zscore("myapp:limits:" + key, token) is not None
    assert loaded_client.exists(PREFIX + key) == 0


def test_limiters_with_other_prefixes_share_no_slots(limiter, redis_url, key):
    with ConcurrentRunsLimiter(redis_url, key_prefix="other:") as other:
        assert limiter.acquire(key, 1) is not None

        assert other.acquire(key, 1) is not None
        assert other.get_count(key) == 1


def test_bytes_key_names_same_slots_as_str_key(limiter, key):
    limiter.acquire(key, 1)

    assert limiter.acquire(key.encode(), 1) is None
    assert limiter.get_count(key.encode()) == 1


# slot() ----------------------------------------------------------------------


def test_slot_holds_slot_during_block(limiter, key):
    with limiter.slot(key, 1) as token:
        assert TOKEN_PATTERN.fullmatch(token)
        assert list(limiter.get_holders(key)) == [token]

    assert limiter.get_count(key) == 0


def test_slot_full_raises_slot_limit_reached(limiter, key):
    with limiter.slot(key, 1):
        with pytest.raises(SlotLimitReachedError) as raised:
            with limiter.slot(key, 1):
                pytest.fail("the block ran without a slot")

        assert limiter.get_count(key) == 1

    error = raised.value
    assert isinstance(error, ConcurrentRunsError)
    assert isinstance(error, RuntimeError)
    assert error.key == key
    assert error.max_slots == 1
    assert key in str(error)


def test_slot_limit_reached_is_caught_as_runtime_error(limiter, key):
    limiter.acquire(key, 1)

    with pytest.raises(RuntimeError):
        with limiter.slot(key, 1):
            pass


def test_slot_is_released_when_block_raises(limiter, key):
    class BlockFailed(Exception):
        pass

    with pytest.raises(BlockFailed):
        with limiter.slot(key, 1):
            assert limiter.get_count(key) == 1
            raise BlockFailed

    assert limiter.get_count(key) == 0


def test_slot_tokens_differ_between_blocks(limiter, key):
    with limiter.slot(key, 2) as first:
        with limiter.slot(key, 2) as second:
            assert first != second
            assert limiter.get_count(key) == 2


# Argument checks before any Redis call -----------------------------------------

TOO_LONG_TOKEN = "x" * 257

BAD_CALLS = [
    ("acquire-key-int", lambda lim: lim.acquire(123, 1), TypeError),
    ("acquire-key-none", lambda lim: lim.acquire(None, 1), TypeError),
    ("acquire-key-empty", lambda lim: lim.acquire("", 1), ValueError),
    ("acquire-key-empty-bytes", lambda lim: lim.acquire(b"", 1), ValueError),
    ("acquire-max-slots-0", lambda lim: lim.acquire("k", 0), ValueError),
    ("acquire-max-slots-negative", lambda lim: lim.acquire("k", -1), ValueError),
    ("acquire-max-slots-too-big", lambda lim: lim.acquire("k", 2**31), ValueError),
    ("acquire-max-slots-float", lambda lim: lim.acquire("k", 1.5), TypeError),
    ("acquire-max-slots-bool", lambda lim: lim.acquire("k", True), TypeError),
    ("acquire-max-slots-str", lambda lim: lim.acquire("k", "3"), TypeError),
    ("release-key-int", lambda lim: lim.release(123, "t"), TypeError),
    ("release-token-empty", lambda lim: lim.release("k", ""), ValueError),
    ("release-token-too-long", lambda lim: lim.release("k", TOO_LONG_TOKEN), ValueError),
    ("release-token-none", lambda lim: lim.release("k", None), TypeError),
    ("extend-token-empty", lambda lim: lim.extend("k", ""), ValueError),
    ("extend-token-int", lambda lim: lim.extend("k", 7), TypeError),
    ("extend-timeout-0", lambda lim: lim.extend("k", "t", 0), ValueError),
    ("extend-timeout-negative", lambda lim: lim.extend("k", "t", -1), ValueError),
    ("extend-timeout-nan", lambda lim: lim.extend("k", "t", math.nan), ValueError),
    ("extend-timeout-inf", lambda lim: lim.extend("k", "t", math.inf), ValueError),
    ("extend-timeout-str", lambda lim: lim.extend("k", "t", "5"), TypeError),
    ("extend-timeout-bool", lambda lim: lim.extend("k", "t", True), TypeError),
    ("get-count-key-int", lambda lim: lim.get_count(1), TypeError),
    ("get-count-key-empty", lambda lim: lim.get_count(""), ValueError),
    ("get-holders-key-list", lambda lim: lim.get_holders(["k"]), TypeError),
    ("slot-max-slots-0", lambda lim: lim.slot("k", 0).__enter__(), ValueError),
    ("slot-key-int", lambda lim: lim.slot(5, 1).__enter__(), TypeError),
]


@pytest.fixture
def unreachable_limiter():
    """A limiter whose Redis URL points at a 127.0.0.1 port with no server."""
    limiter = ConcurrentRunsLimiter(unreachable_url(), socket_timeout=0.5)
    yield limiter
    limiter.close()


@pytest.mark.parametrize(
    "call, error", [case[1:] for case in BAD_CALLS], ids=[case[0] for case in BAD_CALLS]
)
def test_bad_argument_raises_before_any_redis_call(unreachable_limiter, call, error):
    with pytest.raises(error):
        call(unreachable_limiter)

    # The same limiter fails on a valid call: the check above came first.
    with pytest.raises(LimiterUnavailableError):
        unreachable_limiter.get_count("k")


@pytest.mark.parametrize(
    "options, error",
    [
        ({"slot_timeout": 0}, ValueError),
        ({"slot_timeout": -1}, ValueError),
        ({"slot_timeout": math.nan}, ValueError),
        ({"slot_timeout": math.inf}, ValueError),
        ({"slot_timeout": "30"}, TypeError),
        ({"slot_timeout": True}, TypeError),
        ({"key_prefix": 5}, TypeError),
    ],
    ids=["timeout-0", "timeout-negative", "timeout-nan", "timeout-inf", "timeout-str",
         "timeout-bool", "prefix-int"],
)
def test_bad_constructor_argument_raises(options, error):
    with pytest.raises(error):
        ConcurrentRunsLimiter(unreachable_url(), **options)


def test_bad_argument_error_names_the_argument(unreachable_limiter):
    with pytest.raises(ValueError, match="max_slots"):
        unreachable_limiter.acquire("k", 0)
    with pytest.raises(ValueError, match="token"):
        unreachable_limiter.release("k", "")
    with pytest.raises(ValueError, match="timeout"):
        unreachable_limiter.extend("k", "t", -1)
    with pytest.raises(TypeError, match="key"):
        unreachable_limiter.get_count(3)


# get_concurrent_limiter() and acquire_slot() -----------------------------------


@pytest.fixture
def clean_environment(monkeypatch):
    """No limiter built yet and no CONCURRENT_RUNS_* or REDIS_URL variable set."""
    monkeypatch.setattr(client_module, "_shared_limiter", None)
    for name in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    built = client_module._shared_limiter
    if built is not None:
        built.close()


def connection_port(limiter: ConcurrentRunsLimiter) -> int:
    return limiter.client.connection_pool.connection_kwargs["port"]


def test_shared_limiter_reads_concurrent_runs_redis_url(
    clean_environment, redis_url, loaded_client, key
):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)

    limiter = get_concurrent_limiter()
    token = limiter.acquire(key, 1)

    assert connection_port(limiter) == loaded_client.connection_pool.connection_kwargs["port"]
    assert loaded_client.zscore(PREFIX + key, token) is not None


def test_shared_limiter_falls_back_to_redis_url(
    clean_environment, redis_url, loaded_client, key
):
    clean_environment.setenv("REDIS_URL", redis_url)

    token = get_concurrent_limiter().acquire(key, 1)

    assert loaded_client.zscore(PREFIX + key, token) is not None


def test_shared_limiter_prefers_concurrent_runs_redis_url(
    clean_environment, redis_url, loaded_client, key
):
    clean_environment.setenv("REDIS_URL", unreachable_url())
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)

    assert get_concurrent_limiter().acquire(key, 1) is not None


def test_shared_limiter_defaults_to_local_redis(clean_environment):
    # Only the settings are read here; the limiter never connects.
    options = get_concurrent_limiter().client.connection_pool.connection_kwargs

    assert options["host"] == "localhost"
    assert options["port"] == 6379
    assert options.get("db", 0) == 0


def test_shared_limiter_reads_slot_timeout(clean_environment, redis_url, loaded_client, key):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)
    clean_environment.setenv("CONCURRENT_RUNS_SLOT_TIMEOUT", "2.5")

    limiter = get_concurrent_limiter()
    token = limiter.acquire(key, 1)

    assert limiter.slot_timeout == 2.5
    assert 0 < limiter.get_holders(key)[token] <= 2.5


def test_shared_limiter_default_slot_timeout_is_300_s(clean_environment, redis_url):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)

    assert get_concurrent_limiter().slot_timeout == 300


def test_shared_limiter_rejects_bad_slot_timeout(clean_environment, redis_url):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)
    clean_environment.setenv("CONCURRENT_RUNS_SLOT_TIMEOUT", "five")

    with pytest.raises(ValueError, match="CONCURRENT_RUNS_SLOT_TIMEOUT"):
        get_concurrent_limiter()


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1", True),
        ("true", True),
        ("yes", True),
        (None, False),
        ("", False),
        ("0", False),
        ("false", False),
        ("no", False),
        ("on", False),
        ("2", False),
    ],
)
def test_shared_limiter_reads_fail_open(clean_environment, redis_url, value, expected):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)
    if value is not None:
        clean_environment.setenv("CONCURRENT_RUNS_FAIL_OPEN", value)

    assert get_concurrent_limiter().fail_open is expected


def test_shared_limiter_with_fail_open_grants_without_redis(clean_environment, caplog):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", unreachable_url())
    clean_environment.setenv("CONCURRENT_RUNS_FAIL_OPEN", "yes")
    caplog.set_level(logging.DEBUG)

    token = get_concurrent_limiter().acquire("k", 1)

    assert TOKEN_PATTERN.fullmatch(token)
    assert package_records(caplog, logging.WARNING)


def test_shared_limiter_is_built_once(clean_environment, redis_url):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)
    first = get_concurrent_limiter()

    clean_environment.setenv("CONCURRENT_RUNS_SLOT_TIMEOUT", "7")
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", unreachable_url())
    second = get_concurrent_limiter()

    assert second is first
    assert second.slot_timeout == 300


def test_shared_limiter_is_built_once_across_threads(clean_environment, redis_url):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)
    built = []
    start = threading.Barrier(8)

    def build() -> None:
        start.wait()
        built.append(get_concurrent_limiter())

    threads = [threading.Thread(target=build) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(built) == 8
    assert all(limiter is built[0] for limiter in built)


def test_acquire_slot_holds_slot_of_shared_limiter(clean_environment, redis_url, loaded_client, key):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)

    with acquire_slot(key, 1) as token:
        assert TOKEN_PATTERN.fullmatch(token)
        assert loaded_client.zscore(PREFIX + key, token) is not None
        with pytest.raises(SlotLimitReachedError):
            with acquire_slot(key, 1):
                pass

    assert get_concurrent_limiter().get_count(key) == 0


def test_acquire_slot_is_released_when_block_raises(clean_environment, redis_url, key):
    clean_environment.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)

    with pytest.raises(KeyError):
        with acquire_slot(key, 1):
            raise KeyError("inside the block")

    assert get_concurrent_limiter().get_count(key) == 0


# The library on the server -----------------------------------------------------


def test_missing_library_is_loaded_on_first_call(limiter, loaded_client, key, caplog):
    loaded_client.function_flush()
    caplog.set_level(logging.DEBUG)

    token = limiter.acquire(key, 1)

    assert token is not None
    assert loaded_client.fcall_ro("runs_version", 0).decode() == packaged_version()
    infos = package_records(caplog, logging.INFO)
    assert len([r for r in infos if "loaded" in r.getMessage()]) == 1
    assert_only_package_logs(caplog)


def test_flushed_library_reloaded_on_next_call(limiter, loaded_client, key, caplog):
    token = limiter.acquire(key, 1)
    loaded_client.function_flush()
    caplog.set_level(logging.DEBUG)

    assert limiter.release(key, token) is True

    assert loaded_client.fcall_ro("runs_version", 0).decode() == packaged_version()
    assert limiter.acquire(key, 1) is not None
    infos = package_records(caplog, logging.INFO)
    assert len([r for r in infos if "loaded" in r.getMessage()]) == 1
    assert_only_package_logs(caplog)


def test_version_is_checked_once_per_limiter(redis_url, loaded_client, key):
    loaded_client.config_resetstat()

    with ConcurrentRunsLimiter(redis_url) as limiter:
        for _ in range(3):
            token = limiter.acquire(key, 1)
            limiter.extend(key, token)
            limiter.release(key, token)
        assert fcall_counts(loaded_client) == (9, 1)

    with ConcurrentRunsLimiter(redis_url) as second:
        second.acquire(key, 1)
        assert fcall_counts(loaded_client) == (10, 2)


def other_major_version() -> str:
    major = int(packaged_version().split(".")[0])
    return f"{major + 1}.0.0"


def test_newer_major_library_raises_version_error(limiter, loaded_client, key):
    installed = other_major_version()
    loaded_client.function_load(server_version_source(installed), replace=True)

    with pytest.raises(LibraryVersionError) as raised:
        limiter.acquire(key, 1)

    message = str(raised.value)
    assert installed in message
    assert packaged_version() in message
    assert "concurrent-runs load" in message
    assert raised.value.installed == installed
    assert raised.value.packaged == packaged_version()
    assert isinstance(raised.value, ConcurrentRunsError)
    assert loaded_client.exists(PREFIX + key) == 0


def test_older_major_library_raises_version_error(limiter, loaded_client, key):
    major = int(packaged_version().split(".")[0])
    installed = f"{major - 1}.9.0" if major > 0 else "0.0.1-old"
    loaded_client.function_load(server_version_source(installed), replace=True)

    with pytest.raises(LibraryVersionError) as raised:
        limiter.acquire(key, 1)

    assert installed in str(raised.value)
    assert packaged_version() in str(raised.value)
    assert "concurrent-runs load" in str(raised.value)


def test_same_major_other_minor_library_is_used(limiter, loaded_client, key):
    major, minor, _patch = packaged_version().split(".")
    installed = f"{major}.{int(minor) + 1}.0"
    loaded_client.function_load(server_version_source(installed), replace=True)

    assert limiter.acquire(key, 1) is not None

    assert loaded_client.fcall_ro("runs_version", 0).decode() == installed


def test_version_error_is_raised_on_every_call(limiter, loaded_client, key):
    loaded_client.function_load(server_version_source(other_major_version()), replace=True)

    for _ in range(2):
        with pytest.raises(LibraryVersionError):
            limiter.get_count(key)


# Redis unreachable -------------------------------------------------------------

UNREACHABLE_CALLS = [
    ("acquire", lambda lim: lim.acquire("k", 1)),
    ("release", lambda lim: lim.release("k", "0" * 32)),
    ("extend", lambda lim: lim.extend("k", "0" * 32)),
    ("get_count", lambda lim: lim.get_count("k")),
    ("get_holders", lambda lim: lim.get_holders("k")),
    ("slot", lambda lim: lim.slot("k", 1).__enter__()),
]


@pytest.mark.parametrize(
    "call", [case[1] for case in UNREACHABLE_CALLS], ids=[case[0] for case in UNREACHABLE_CALLS]
)
def test_unreachable_redis_raises_limiter_unavailable(unreachable_limiter, call, caplog):
    caplog.set_level(logging.DEBUG)

    outcome = run_with_bound(lambda: call(unreachable_limiter))

    assert isinstance(outcome.get("error"), LimiterUnavailableError), outcome
    assert isinstance(outcome["error"], RuntimeError)
    assert_only_package_logs(caplog)


def test_stopped_server_raises_limiter_unavailable(server_folder, key):
    with RedisServer(server_folder) as server:
        url = server.url
    with ConcurrentRunsLimiter(url, socket_timeout=0.5) as limiter:
        outcome = run_with_bound(lambda: limiter.acquire(key, 1))

    assert isinstance(outcome.get("error"), LimiterUnavailableError), outcome


def test_frozen_server_times_out_as_limiter_unavailable(server_folder, key):
    with RedisServer(server_folder) as server:
        with ConcurrentRunsLimiter(server.url, socket_timeout=0.3) as limiter:
            assert limiter.acquire(key, 1) is not None
            server.signal(signal.SIGSTOP)  # accepts connections, never replies

            outcome = run_with_bound(lambda: limiter.acquire(key, 1))

    assert isinstance(outcome.get("error"), LimiterUnavailableError), outcome


def test_restarted_server_gets_library_again(server_folder, key, caplog):
    caplog.set_level(logging.DEBUG)
    server = RedisServer(server_folder)
    with server, ConcurrentRunsLimiter(server.url, socket_timeout=0.5) as limiter:
        assert limiter.acquire(key, 2) is not None
        server.stop()

        with pytest.raises(LimiterUnavailableError):
            limiter.acquire(key, 2)

        server.start()  # the same port, no data and no library
        assert limiter.acquire(key, 2) is not None
        assert limiter.get_count(key) == 1

    assert_only_package_logs(caplog)


def test_fail_open_grants_token_and_logs_warning(caplog):
    caplog.set_level(logging.DEBUG)
    with ConcurrentRunsLimiter(unreachable_url(), fail_open=True, socket_timeout=0.5) as limiter:
        outcome = run_with_bound(lambda: limiter.acquire("k", 1))

    token = outcome.get("result")
    assert isinstance(token, str), outcome
    assert TOKEN_PATTERN.fullmatch(token)
    warnings = package_records(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert "'k'" in warnings[0].getMessage()
    assert_only_package_logs(caplog)


def test_fail_open_slot_runs_block_without_redis(caplog):
    caplog.set_level(logging.DEBUG)
    ran = []
    with ConcurrentRunsLimiter(unreachable_url(), fail_open=True, socket_timeout=0.5) as limiter:
        with limiter.slot("k", 1) as token:
            ran.append(token)

    assert len(ran) == 1
    assert TOKEN_PATTERN.fullmatch(ran[0])
    assert package_records(caplog, logging.WARNING)
    assert_only_package_logs(caplog)


def test_fail_open_enforces_limit_when_reachable(redis_url, loaded_client, key):
    with ConcurrentRunsLimiter(redis_url, fail_open=True) as limiter:
        assert limiter.acquire(key, 1) is not None
        assert limiter.acquire(key, 1) is None


def test_fail_closed_logs_nothing_on_other_loggers(limiter, key, caplog):
    caplog.set_level(logging.DEBUG)

    with limiter.slot(key, 1):
        limiter.get_holders(key)

    assert_only_package_logs(caplog)


# Packaging ---------------------------------------------------------------------


def test_package_is_marked_typed():
    assert resources.files("concurrent_runs").joinpath("py.typed").is_file()


def test_errors_derive_from_package_base():
    for error in (SlotLimitReachedError, LimiterUnavailableError, LibraryVersionError):
        assert issubclass(error, ConcurrentRunsError)
    assert issubclass(ConcurrentRunsError, RuntimeError)
    assert concurrent_runs.ConcurrentRunsLimiter is ConcurrentRunsLimiter


def test_slot_object_reentered_while_held_raises(limiter, key):
    guard = limiter.slot(key, 3)

    with guard:
        with pytest.raises(ConcurrentRunsError, match="already held"):
            with guard:
                pass
        assert limiter.get_count(key) == 1

    assert limiter.get_count(key) == 0


def test_slot_object_reused_after_exit_takes_new_slot(limiter, key):
    guard = limiter.slot(key, 1)

    with guard as first:
        assert limiter.get_count(key) == 1
    with guard as second:
        assert limiter.get_count(key) == 1

    assert first != second
    assert guard.token is None
    assert limiter.get_count(key) == 0


def test_slot_object_shared_by_threads_leaks_nothing(limiter, key):
    guard = limiter.slot(key, 3)
    rejected = []

    def enter_many_times():
        for _ in range(20):
            try:
                with guard:
                    pass
            except ConcurrentRunsError as exc:
                rejected.append(exc)

    threads = [threading.Thread(target=enter_many_times) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert all("already held" in str(exc) for exc in rejected)
    assert limiter.get_count(key) == 0


def test_cluster_client_against_plain_server_raises_package_error(redis_url, loaded_client):
    with pytest.raises(ConcurrentRunsError, match="Redis Cluster"):
        ConcurrentRunsLimiter(redis_url, cluster=True)
