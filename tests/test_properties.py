"""Hostile input, generated with hypothesis, over FCALL and over the wrapper.

FCALL replies are read off the socket with a small RESP reader, because
redis-py drops the ``ERR`` code from an error's text.
"""

from __future__ import annotations

import math
import re
import socket
import sys
import uuid
from typing import Any, Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from concurrent_runs import ConcurrentRunsLimiter, packaged_version
from concurrent_runs.library import library_source

from servers import LOCALHOST, RedisServer

# Hypothesis warns when the global random state moves while it draws examples.
# Threads left behind by other tests (redis-py's retry jitter, for one) can move
# it, and that is no fault of the code under test here.
pytestmark = pytest.mark.filterwarnings(
    "ignore::hypothesis.errors.HypothesisDeprecationWarning"
)

PREFIX = "concurrent_runs:"
MAX_SLOTS_LIMIT = 2**31 - 1
MAX_TIMEOUT_MS = 2**40
MAX_TOKEN_BYTES = 256
# Waiter entries are named with a NUL first byte, so tokens may not start with one.
RESERVED_TOKEN_PREFIX = b"\x00"
LONG_LEASE_MS = 60_000
THIRTY_DAYS_S = 30 * 24 * 3600

# Arguments of each function, in the order the library checks them.
FUNCTION_ARGUMENTS = {
    "runs_acquire": ("MAX_SLOTS", "TIMEOUT_MS", "TOKEN"),
    "runs_wait": ("MAX_SLOTS", "TIMEOUT_MS", "TOKEN", "WAIT_LEASE_MS"),
    "runs_release": ("TOKEN",),
    "runs_extend": ("TOKEN", "TIMEOUT_MS"),
    "runs_count": (),
    "runs_holders": ("LIMIT",),
    "runs_reap": (),
    "runs_version": (),
}
INTEGER_MAXIMUM = {
    "MAX_SLOTS": MAX_SLOTS_LIMIT,
    "LIMIT": MAX_SLOTS_LIMIT,
    "TIMEOUT_MS": MAX_TIMEOUT_MS,
    "WAIT_LEASE_MS": MAX_TIMEOUT_MS,
}
READ_ONLY = {"runs_count", "runs_holders", "runs_version"}

HOSTILE_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class ErrorReply(str):
    """An error reply, as the server sent it (code word included)."""


class RespConnection:
    """A bare RESP2 connection that returns error replies instead of raising."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOCALHOST, port), timeout=10)
        self.reader = self.sock.makefile("rb")

    def call(self, *parts: bytes) -> Any:
        frame = [b"*%d\r\n" % len(parts)]
        for part in parts:
            frame.append(b"$%d\r\n%s\r\n" % (len(part), part))
        self.sock.sendall(b"".join(frame))
        return self.read_reply()

    def read_reply(self) -> Any:
        line = self.reader.readline()
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body
        if kind == b"-":
            return ErrorReply(body.decode("utf-8", "replace"))
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            return None if size < 0 else self.reader.read(size + 2)[:-2]
        if kind == b"*":
            size = int(body)
            return None if size < 0 else [self.read_reply() for _ in range(size)]
        raise AssertionError(f"unexpected RESP line {line!r}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("hostile")) as running:
        client = running.client()
        client.function_load(library_source(), replace=True)
        client.close()
        yield running


@pytest.fixture(scope="module")
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def resp(server: RedisServer) -> Iterator[RespConnection]:
    connection = RespConnection(server.port)
    yield connection
    connection.close()


def busy_key(resp: RespConnection) -> bytes:
    """Make a fresh key with two live slots and a waiter in line."""
    key = f"{PREFIX}hostile-{uuid.uuid4().hex}".encode()
    lease = str(LONG_LEASE_MS).encode()
    for token in (b"holder-1", b"holder-2"):
        assert resp.call(b"FCALL", b"runs_acquire", b"1", key, b"2", lease, token) == 1
    waited = resp.call(b"FCALL", b"runs_wait", b"1", key, b"2", lease, b"waiter", lease)
    assert waited[0] == 0
    return key


def key_state(resp: RespConnection, key: bytes) -> tuple:
    entries = resp.call(b"ZRANGE", key, b"0", b"-1", b"WITHSCORES")
    return entries, resp.call(b"PEXPIRETIME", key)


# What the library accepts, as the contract states it --------------------------


def is_valid_integer(name: str, value: bytes) -> bool:
    return (
        re.fullmatch(rb"[1-9][0-9]*", value) is not None
        and len(value) <= 16
        and int(value) <= INTEGER_MAXIMUM[name]
    )


def is_valid_token(value: bytes) -> bool:
    return 1 <= len(value) <= MAX_TOKEN_BYTES and not value.startswith(
        RESERVED_TOKEN_PREFIX
    )


def expected_error(function: str, keys: list[bytes], args: list[bytes]) -> str | None:
    """Return the words the error reply must contain, or None for a valid call."""
    key_count = 0 if function == "runs_version" else 1
    if len(keys) != key_count:
        return "wrong number of keys"
    names = FUNCTION_ARGUMENTS[function]
    optional = function == "runs_holders"
    if len(args) > len(names) or (len(args) < len(names) and not optional):
        return "wrong number of arguments"
    for name, value in zip(names, args):
        valid = is_valid_token(value) if name == "TOKEN" else is_valid_integer(name, value)
        if not valid:
            return f"invalid {name}"
    return None


def check_valid_reply(function: str, reply: Any) -> None:
    assert not isinstance(reply, ErrorReply), reply
    if function in ("runs_acquire", "runs_release", "runs_extend"):
        assert reply in (0, 1)
    elif function in ("runs_count", "runs_reap"):
        assert isinstance(reply, int) and reply >= 0
    elif function == "runs_wait":
        assert len(reply) == 3 and all(isinstance(part, int) for part in reply)
        assert reply[0] in (0, 1)
    elif function == "runs_holders":
        assert len(reply) % 2 == 0
        assert all(isinstance(ms_left, int) and ms_left > 0 for ms_left in reply[1::2])
    else:
        assert reply == packaged_version().encode()


# Hostile FCALL arguments -----------------------------------------------------

SPECIAL_ARGUMENTS = [
    b"", b"0", b"1", b"-1", b"01", b"+1", b" 1", b"1 ", b"1.0", b"1e3", b"0x10",
    b"2147483647", b"2147483648", b"1099511627776", b"1099511627777",
    b"99999999999999999", b"inf", b"nan", b"\x00", b"\x00lwaiter", b"\x00qwaiter",
    b"\x00lX", b"\x00qX", b"holder-1", b"waiter", b"a\r\nb", b"{tag}", b"\xff\xfe",
    b"x" * 256, b"x" * 257, b"x" * 65536,
]

argument = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda number: str(number).encode()),
    st.floats().map(lambda number: repr(number).encode()),
    st.text(max_size=300).map(lambda text: text.encode("utf-8")),
    st.binary(max_size=300),
    st.sampled_from(SPECIAL_ARGUMENTS),
)


@HOSTILE_SETTINGS
@given(
    function=st.sampled_from(sorted(FUNCTION_ARGUMENTS)),
    key_count=st.integers(min_value=0, max_value=2),
    args=st.lists(argument, max_size=6),
)
def test_fcall_hostile_arguments_get_answer_or_err(resp, function, key_count, args):
    key = busy_key(resp)
    keys = [key, key + b"-other"][:key_count]
    before = key_state(resp, key)
    command = b"FCALL_RO" if function in READ_ONLY else b"FCALL"

    reply = resp.call(command, function.encode(), str(len(keys)).encode(), *keys, *args)

    expected = expected_error(function, keys, args)
    if expected is None:
        check_valid_reply(function, reply)
        return
    assert isinstance(reply, ErrorReply), (expected, reply)
    assert reply.startswith("ERR "), reply
    assert expected in reply, reply
    assert key_state(resp, key) == before
    assert resp.call(b"EXISTS", key + b"-other") == 0


@HOSTILE_SETTINGS
@given(
    function=st.sampled_from(sorted(FUNCTION_ARGUMENTS)),
    key_count=st.one_of(
        st.integers(min_value=-3, max_value=8).map(lambda number: str(number).encode()),
        st.sampled_from([b"", b"x", b"1.5", b"99999999999999999999"]),
    ),
    args=st.lists(argument, max_size=3),
)
def test_fcall_hostile_key_count_gets_answer_or_err(resp, function, key_count, args):
    key = busy_key(resp)
    before = key_state(resp, key)

    reply = resp.call(b"FCALL", function.encode(), key_count, key, *args)

    if isinstance(reply, ErrorReply):
        assert reply.startswith("ERR "), reply
        assert key_state(resp, key) == before


# Crafted tokens against the waiter entries --------------------------------------

CRAFTED_TOKENS = [b"A", b"B", b"\x00lA", b"\x00qA", b"\x00qB", b"\x00l\x00qA"]


class CraftedTokenMachine(RuleBasedStateMachine):
    """Tokens that look like waiter entries never take or drop anyone's slot."""

    def __init__(self, connection: RespConnection) -> None:
        super().__init__()
        self.connection = connection
        self.key = f"{PREFIX}crafted-{uuid.uuid4().hex}".encode()
        self.max_slots = 1
        self.holders: set[bytes] = set()

    def fcall(self, function: bytes, *args: bytes) -> Any:
        return self.connection.call(b"FCALL", function, b"1", self.key, *args)

    def check_rejected(self, token: bytes, reply: Any) -> bool:
        """Return True when the library refused a reserved token, as it must."""
        if not token.startswith(RESERVED_TOKEN_PREFIX):
            assert not isinstance(reply, ErrorReply), reply
            return False
        assert isinstance(reply, ErrorReply), (token, reply)
        assert reply.startswith("ERR invalid TOKEN"), reply
        return True

    @rule(token=st.sampled_from(CRAFTED_TOKENS))
    def acquire(self, token: bytes) -> None:
        reply = self.fcall(b"runs_acquire", b"%d" % self.max_slots, b"60000", token)
        if not self.check_rejected(token, reply) and reply == 1:
            self.holders.add(token)

    @rule(token=st.sampled_from(CRAFTED_TOKENS))
    def wait(self, token: bytes) -> None:
        reply = self.fcall(b"runs_wait", b"%d" % self.max_slots, b"60000", token, b"60000")
        if not self.check_rejected(token, reply) and reply[0] == 1:
            self.holders.add(token)

    @rule(token=st.sampled_from(CRAFTED_TOKENS))
    def release(self, token: bytes) -> None:
        reply = self.fcall(b"runs_release", token)
        if not self.check_rejected(token, reply):
            assert reply == (1 if token in self.holders else 0)
            self.holders.discard(token)

    @rule(token=st.sampled_from(CRAFTED_TOKENS))
    def extend(self, token: bytes) -> None:
        reply = self.fcall(b"runs_extend", token, b"60000")
        if not self.check_rejected(token, reply):
            assert reply == (1 if token in self.holders else 0)

    @invariant()
    def holders_match_replies(self) -> None:
        reply = self.connection.call(b"FCALL_RO", b"runs_holders", b"1", self.key)
        assert set(reply[::2]) == self.holders
        assert len(self.holders) <= self.max_slots


def test_crafted_tokens_never_take_or_drop_slots(resp):
    run_state_machine_as_test(
        lambda: CraftedTokenMachine(resp),
        settings=settings(max_examples=60, stateful_step_count=20, deadline=None),
    )


# The wrapper's argument checks ---------------------------------------------------


def command_calls(client: redis.Redis) -> int:
    """Return how many commands other than INFO the server has run."""
    stats = client.info("commandstats")
    return sum(stat["calls"] for name, stat in stats.items() if name != "cmdstat_info")


any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.sampled_from(["", b"", "\udcff", "x" * 300, b"x" * 300, 2**31, 2**31 - 1]),
    st.lists(st.integers(), max_size=2),
    st.builds(bytearray, st.binary(max_size=4)),
)


def is_valid_key(value: object) -> bool:
    if isinstance(value, bytes):
        return len(value) > 0
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return len(value) > 0
    return False


def is_valid_token_value(value: object) -> bool:
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return isinstance(value, bytes) and is_valid_token(value)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_valid_seconds(value: object) -> bool:
    if not is_number(value) or not value > 0:
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return value * 1000 <= MAX_TIMEOUT_MS


def is_valid_wait(value: object) -> bool:
    if value is None:
        return True
    if not is_number(value) or not value >= 0:
        return False
    return value <= sys.float_info.max and not (
        isinstance(value, float) and math.isinf(value)
    )


def is_valid_max_slots(value: object) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 1 <= value <= MAX_SLOTS_LIMIT
    )


@pytest.fixture(scope="module")
def wrapper(server: RedisServer) -> Iterator[ConcurrentRunsLimiter]:
    limiter = ConcurrentRunsLimiter(server.url, slot_timeout=5, fail_open=True)
    yield limiter
    limiter.close()


def check_rejected_locally(admin: redis.Redis, call, valid: bool) -> None:
    """Run call; unless valid, expect TypeError or ValueError and no command sent."""
    before = command_calls(admin)
    if valid:
        call()
        return
    with pytest.raises((TypeError, ValueError)):
        call()
    assert command_calls(admin) == before


@HOSTILE_SETTINGS
@given(
    key=st.one_of(any_value, st.just("k")),
    max_slots=st.one_of(any_value, st.just(2)),
    wait=st.one_of(any_value, st.just(None)),
)
def test_wrapper_acquire_bad_types_raise_before_redis(admin, wrapper, key, max_slots, wait):
    valid = is_valid_key(key) and is_valid_max_slots(max_slots) and is_valid_wait(wait)
    if valid and wait:
        wait = min(wait, 0.01)

    check_rejected_locally(admin, lambda: wrapper.acquire(key, max_slots, wait=wait), valid)


@HOSTILE_SETTINGS
@given(
    key=st.one_of(any_value, st.just("k")),
    token=st.one_of(any_value, st.just("t" * 32)),
    timeout=st.one_of(any_value, st.just(None), st.just(1)),
)
def test_wrapper_release_extend_bad_types_raise_before_redis(
    admin, wrapper, key, token, timeout
):
    valid_pair = is_valid_key(key) and is_valid_token_value(token)
    valid_timeout = timeout is None or is_valid_seconds(timeout)

    check_rejected_locally(admin, lambda: wrapper.release(key, token), valid_pair)
    check_rejected_locally(
        admin, lambda: wrapper.extend(key, token, timeout), valid_pair and valid_timeout
    )


@HOSTILE_SETTINGS
@given(key=st.one_of(any_value, st.just("k")))
def test_wrapper_read_calls_bad_key_raise_before_redis(admin, wrapper, key):
    valid = is_valid_key(key)

    check_rejected_locally(admin, lambda: wrapper.get_count(key), valid)
    check_rejected_locally(admin, lambda: wrapper.get_holders(key), valid)


@HOSTILE_SETTINGS
@given(slot_timeout=any_value)
def test_wrapper_bad_slot_timeout_raises_at_construction(server, slot_timeout):
    if is_valid_seconds(slot_timeout):
        ConcurrentRunsLimiter(server.url, slot_timeout=slot_timeout).close()
        return
    with pytest.raises((TypeError, ValueError)):
        ConcurrentRunsLimiter(server.url, slot_timeout=slot_timeout)


# Odd keys and tokens, and the extreme limits ----------------------------------

ODD_KEYS = {
    "spaces": "a key with spaces",
    "braces": "{tenant}:{job}",
    "newlines": "line one\nline two\r\n",
    "non_utf8": b"\xff\xfe\x00raw",
    "long_64kib": "k" * 65536,
}


@pytest.mark.parametrize("odd_key", ODD_KEYS.values(), ids=ODD_KEYS.keys())
def test_odd_key_works_end_to_end(admin, odd_key):
    limiter = ConcurrentRunsLimiter(client=admin, slot_timeout=30)
    redis_key = (PREFIX.encode() + odd_key) if isinstance(odd_key, bytes) else PREFIX + odd_key

    token = limiter.acquire(odd_key, 1)
    assert token is not None
    assert limiter.acquire(odd_key, 1) is None
    assert limiter.get_count(odd_key) == 1
    assert list(limiter.get_holders(odd_key)) == [token]
    assert admin.exists(redis_key) == 1
    assert limiter.extend(odd_key, token, 60) is True
    assert limiter.release(odd_key, token) is True
    assert limiter.get_count(odd_key) == 0
    assert admin.exists(redis_key) == 0


ODD_TOKENS = {
    "spaces": b"a token with spaces",
    "braces": b"{token}",
    "newlines": b"one\r\ntwo\n",
    "non_utf8": b"\xff\xfe\x80",
    "nul_inside": b"x\x00ly",
    "max_size": b"t" * MAX_TOKEN_BYTES,
}


@pytest.mark.parametrize("odd_token", ODD_TOKENS.values(), ids=ODD_TOKENS.keys())
def test_odd_token_releases_only_its_own_slot(admin, resp, odd_token):
    limiter = ConcurrentRunsLimiter(client=admin, slot_timeout=30)
    key = f"odd-token-{uuid.uuid4().hex}"
    redis_key = (PREFIX + key).encode()
    other = limiter.acquire(key, 3)
    assert resp.call(b"FCALL", b"runs_acquire", b"1", redis_key, b"3", b"30000", odd_token) == 1

    assert limiter.extend(key, odd_token, 60) is True
    assert limiter.get_count(key) == 2
    assert limiter.release(key, odd_token) is True
    assert limiter.release(key, odd_token) is False
    assert list(limiter.get_holders(key)) == [other]


@pytest.mark.parametrize("max_slots", [1, MAX_SLOTS_LIMIT])
def test_extreme_max_slots_take_and_free(admin, max_slots):
    limiter = ConcurrentRunsLimiter(client=admin, slot_timeout=30)
    key = f"extreme-{uuid.uuid4().hex}"

    tokens = [limiter.acquire(key, max_slots) for _ in range(3)]

    expected = 1 if max_slots == 1 else 3
    assert sum(token is not None for token in tokens) == expected
    assert limiter.get_count(key) == expected
    for token in tokens:
        if token is not None:
            assert limiter.release(key, token) is True


def test_one_ms_lease_ends_at_once(admin):
    limiter = ConcurrentRunsLimiter(client=admin, slot_timeout=0.001)
    key = f"short-{uuid.uuid4().hex}"

    first = limiter.acquire(key, 1)
    assert first is not None
    seconds, microseconds = admin.time()
    start_ms = seconds * 1000 + microseconds // 1000
    while True:
        seconds, microseconds = admin.time()
        if seconds * 1000 + microseconds // 1000 > start_ms + 1:
            break

    assert limiter.get_count(key) == 0
    assert limiter.extend(key, first) is False
    second = limiter.acquire(key, 1)
    assert second is not None
    assert admin.pttl(PREFIX + key) in (-2, 0, 1)


def test_thirty_day_lease_sets_thirty_day_ttl(admin):
    limiter = ConcurrentRunsLimiter(client=admin, slot_timeout=THIRTY_DAYS_S)
    key = f"long-{uuid.uuid4().hex}"

    token = limiter.acquire(key, 1)

    assert token is not None
    ttl_ms = admin.pttl(PREFIX + key)
    assert THIRTY_DAYS_S * 1000 - 5000 < ttl_ms <= THIRTY_DAYS_S * 1000
    (ms_left,) = limiter.get_holders(key).values()
    assert THIRTY_DAYS_S - 5 < ms_left <= THIRTY_DAYS_S
    assert limiter.release(key, token) is True
