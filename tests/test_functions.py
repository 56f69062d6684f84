"""The Lua library, called directly with FCALL on a real Redis server.

Every test here talks to the functions the way `redis-cli` would, with no
Python wrapper in between, so they pin down the contract of the Redis side:
replies, lease rules, TTLs, argument checks and bounded cleanup.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
import redis

from concurrent_runs.library import packaged_version

LONG_MS = 60_000  # a lease that no test outlives
SHORT_MS = 50  # a lease that a test waits out
CLEANUP_BATCH = 16  # ended entries removed by one acquire, wait, release or extend
REAP_BATCH = 250  # ended slots removed by one runs_reap call
MAX_SLOTS_LIMIT = 2**31 - 1
MAX_TIMEOUT_MS = 2**40
WAITER_LEASE_PREFIX = b"\0l"
WAITER_ORDER_PREFIX = b"\0q"


# Helpers -------------------------------------------------------------------


def acquire(client, key, token, max_slots=1, timeout_ms=LONG_MS):
    return client.fcall("runs_acquire", 1, key, max_slots, timeout_ms, token)


def wait_in_line(client, key, token, max_slots=1, timeout_ms=LONG_MS, wait_lease_ms=LONG_MS):
    return client.fcall("runs_wait", 1, key, max_slots, timeout_ms, token, wait_lease_ms)


def release(client, key, token):
    return client.fcall("runs_release", 1, key, token)


def extend(client, key, token, timeout_ms):
    return client.fcall("runs_extend", 1, key, token, timeout_ms)


def count(client, key):
    return client.fcall_ro("runs_count", 1, key)


def holders(client, key, *limit):
    flat = client.fcall_ro("runs_holders", 1, key, *limit)
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def reap(client, key):
    return client.fcall("runs_reap", 1, key)


def server_ms(client) -> int:
    seconds, microseconds = client.time()
    return seconds * 1000 + microseconds // 1000


def wait_for_server_time(client, end_ms: int) -> None:
    """Sleep until Redis server time is past `end_ms`, so a lease ending then has ended."""
    while server_ms(client) <= end_ms:
        time.sleep(0.01)


def lease_end(client, key, token) -> int:
    score = client.zscore(key, token)
    assert score is not None, f"{token!r} holds no entry in {key!r}"
    return int(score)


def expire_time_ms(client, key) -> int:
    """Return PEXPIRETIME: the absolute expiry in ms, -1 without a TTL, -2 without the key."""
    return client.execute_command("PEXPIRETIME", key)


def assert_ttl_covers_leases(client, key) -> None:
    """Assert that KEY expires no sooner than its longest slot or waiter lease."""
    expires_at = expire_time_ms(client, key)
    assert expires_at != -2, f"{key!r} does not exist"
    assert expires_at != -1, f"{key!r} has no TTL"
    entries = client.zrange(key, 0, -1, withscores=True)
    ends = []
    for member, score in entries:
        if member.startswith(WAITER_ORDER_PREFIX):
            continue
        if member.startswith(WAITER_LEASE_PREFIX):
            ends.append(int(score) - 2**46)
        else:
            ends.append(int(score))
    assert ends, f"{key!r} holds no lease"
    assert expires_at >= max(ends)


def key_state(client, key):
    """Return everything a bad call could change: the value, the entries, the expiry."""
    return (
        client.dump(key),
        client.zrange(key, 0, -1, withscores=True),
        expire_time_ms(client, key),
    )


def raw_first_line(client, *command: str | bytes | int) -> bytes:
    """Send one command over a plain socket; return the first line of the reply.

    This shows the reply as redis-cli receives it, before redis-py strips the
    error code from an error message.
    """
    options = client.connection_pool.connection_kwargs
    parts = [part if isinstance(part, bytes) else str(part).encode() for part in command]
    request = b"*%d\r\n" % len(parts)
    for part in parts:
        request += b"$%d\r\n%s\r\n" % (len(part), part)
    with socket.create_connection((options["host"], options["port"]), timeout=10) as conn:
        conn.sendall(request)
        reply = b""
        while b"\r\n" not in reply:
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


# runs_acquire ----------------------------------------------------------------


def test_acquire_free_slot_returns_1(loaded_client, key):
    assert acquire(loaded_client, key, "t1", max_slots=2) == 1
    assert acquire(loaded_client, key, "t2", max_slots=2) == 1

    assert count(loaded_client, key) == 2
    assert loaded_client.zscore(key, "t1") is not None
    assert loaded_client.zscore(key, "t2") is not None


def test_acquire_full_key_returns_0(loaded_client, key):
    acquire(loaded_client, key, "t1", max_slots=1)

    assert acquire(loaded_client, key, "t2", max_slots=1) == 0

    assert count(loaded_client, key) == 1
    assert loaded_client.zscore(key, "t2") is None


def test_acquire_same_token_takes_no_second_slot(loaded_client, key):
    assert acquire(loaded_client, key, "t1", max_slots=3) == 1
    assert acquire(loaded_client, key, "t1", max_slots=3) == 1

    assert count(loaded_client, key) == 1
    assert loaded_client.zcard(key) == 1


def test_acquire_same_token_on_full_key_refreshes_lease(loaded_client, key):
    acquire(loaded_client, key, "t1", max_slots=1, timeout_ms=1_000)
    first_end = lease_end(loaded_client, key, "t1")

    before = server_ms(loaded_client)
    assert acquire(loaded_client, key, "t1", max_slots=1, timeout_ms=LONG_MS) == 1
    after = server_ms(loaded_client)

    second_end = lease_end(loaded_client, key, "t1")
    assert second_end > first_end
    assert before + LONG_MS <= second_end <= after + LONG_MS
    assert count(loaded_client, key) == 1


def test_acquire_over_ended_lease_succeeds(loaded_client, key):
    acquire(loaded_client, key, "old", max_slots=1, timeout_ms=SHORT_MS)
    wait_for_server_time(loaded_client, lease_end(loaded_client, key, "old"))

    assert acquire(loaded_client, key, "new", max_slots=1) == 1

    assert count(loaded_client, key) == 1
    assert [token for token, _ in holders(loaded_client, key)] == [b"new"]


def test_acquire_accepts_largest_arguments(loaded_client, key):
    longest_token = "x" * 256
    multibyte_token = "é" * 128  # 256 bytes in UTF-8

    assert acquire(loaded_client, key, longest_token, MAX_SLOTS_LIMIT, MAX_TIMEOUT_MS) == 1
    assert acquire(loaded_client, key, multibyte_token, MAX_SLOTS_LIMIT, LONG_MS) == 1

    assert count(loaded_client, key) == 2
    assert_ttl_covers_leases(loaded_client, key)


# runs_release ----------------------------------------------------------------


def test_release_live_slot_returns_1_and_frees_it(loaded_client, key):
    acquire(loaded_client, key, "t1", max_slots=1)

    assert release(loaded_client, key, "t1") == 1

    assert count(loaded_client, key) == 0
    assert acquire(loaded_client, key, "t2", max_slots=1) == 1


def test_release_unknown_token_returns_0(loaded_client, key):
    acquire(loaded_client, key, "t1", max_slots=1)

    assert release(loaded_client, key, "stranger") == 0

    assert count(loaded_client, key) == 1


def test_release_twice_returns_0_the_second_time(loaded_client, key):
    acquire(loaded_client, key, "t1")

    assert release(loaded_client, key, "t1") == 1
    assert release(loaded_client, key, "t1") == 0


def test_release_ended_lease_returns_0_and_removes_it(loaded_client, key):
    acquire(loaded_client, key, "t1", timeout_ms=SHORT_MS)
    wait_for_server_time(loaded_client, lease_end(loaded_client, key, "t1"))

    assert release(loaded_client, key, "t1") == 0

    assert loaded_client.zscore(key, "t1") is None


# runs_extend -----------------------------------------------------------------


def test_extend_live_lease_ends_timeout_from_now(loaded_client, key):
    acquire(loaded_client, key, "t1", timeout_ms=1_000)

    before = server_ms(loaded_client)
    assert extend(loaded_client, key, "t1", LONG_MS) == 1
    after = server_ms(loaded_client)

    assert before + LONG_MS <= lease_end(loaded_client, key, "t1") <= after + LONG_MS


def test_extend_may_shorten_lease(loaded_client, key):
    acquire(loaded_client, key, "t1", timeout_ms=LONG_MS)

    before = server_ms(loaded_client)
    assert extend(loaded_client, key, "t1", 5_000) == 1
    after = server_ms(loaded_client)

    assert before + 5_000 <= lease_end(loaded_client, key, "t1") <= after + 5_000


def test_extend_unknown_token_returns_0_and_creates_nothing(loaded_client, key):
    assert extend(loaded_client, key, "stranger", LONG_MS) == 0

    assert loaded_client.exists(key) == 0


def test_extend_ended_lease_never_revives(loaded_client, key):
    acquire(loaded_client, key, "t1", timeout_ms=SHORT_MS)
    end = lease_end(loaded_client, key, "t1")
    wait_for_server_time(loaded_client, end)

    assert extend(loaded_client, key, "t1", LONG_MS) == 0

    score = loaded_client.zscore(key, "t1")
    assert score is None or int(score) == end
    assert count(loaded_client, key) == 0
    assert holders(loaded_client, key) == []


def test_extend_released_slot_returns_0(loaded_client, key):
    acquire(loaded_client, key, "t1")
    release(loaded_client, key, "t1")

    assert extend(loaded_client, key, "t1", LONG_MS) == 0

    assert count(loaded_client, key) == 0


# runs_count and runs_holders -------------------------------------------------


def test_count_missing_key_is_0(loaded_client, key):
    assert count(loaded_client, key) == 0


def test_ended_lease_never_counts_before_removal(loaded_client, key):
    acquire(loaded_client, key, "ended", max_slots=2, timeout_ms=SHORT_MS)
    acquire(loaded_client, key, "live", max_slots=2, timeout_ms=LONG_MS)
    wait_for_server_time(loaded_client, lease_end(loaded_client, key, "ended"))

    assert loaded_client.zcard(key) == 2  # still there, not removed yet
    assert count(loaded_client, key) == 1
    assert [token for token, _ in holders(loaded_client, key)] == [b"live"]


def test_holders_lists_soonest_end_first(loaded_client, key):
    acquire(loaded_client, key, "t30", max_slots=3, timeout_ms=30_000)
    acquire(loaded_client, key, "t10", max_slots=3, timeout_ms=10_000)
    acquire(loaded_client, key, "t20", max_slots=3, timeout_ms=20_000)

    listed = holders(loaded_client, key)

    assert [token for token, _ in listed] == [b"t10", b"t20", b"t30"]
    for (token, ms_left), timeout_ms in zip(listed, (10_000, 20_000, 30_000)):
        assert 0 < ms_left <= timeout_ms, token


def test_holders_ms_left_matches_lease_end(loaded_client, key):
    acquire(loaded_client, key, "t1", timeout_ms=LONG_MS)
    end = lease_end(loaded_client, key, "t1")

    before = server_ms(loaded_client)
    [(token, ms_left)] = holders(loaded_client, key)
    after = server_ms(loaded_client)

    assert token == b"t1"
    assert end - after <= ms_left <= end - before


def test_holders_limit_returns_soonest_ending(loaded_client, key):
    for index, timeout_ms in enumerate((40_000, 10_000, 30_000, 20_000)):
        acquire(loaded_client, key, f"t{index}", max_slots=4, timeout_ms=timeout_ms)

    assert [token for token, _ in holders(loaded_client, key, 2)] == [b"t1", b"t3"]
    assert len(holders(loaded_client, key, 1)) == 1
    assert len(holders(loaded_client, key, 10)) == 4


def test_holders_missing_key_is_empty(loaded_client, key):
    assert holders(loaded_client, key) == []


# runs_reap ---------------------------------------------------------------------


def test_reap_removes_batches_then_the_rest(loaded_client, key):
    loaded_client.zadd(key, {f"ended-{i}": 1_000 + i for i in range(617)})
    acquire(loaded_client, key, "live", max_slots=1)
    ended_left = loaded_client.zcard(key) - 1  # the acquire removed a few itself

    assert reap(loaded_client, key) == REAP_BATCH
    assert reap(loaded_client, key) == REAP_BATCH
    assert reap(loaded_client, key) == ended_left - 2 * REAP_BATCH
    assert reap(loaded_client, key) == 0

    assert loaded_client.zrange(key, 0, -1) == [b"live"]
    assert_ttl_covers_leases(loaded_client, key)


def test_reap_keeps_live_slots_and_waiters(loaded_client, key):
    acquire(loaded_client, key, "live", max_slots=1)
    wait_in_line(loaded_client, key, "waiter", max_slots=1)
    before = loaded_client.zrange(key, 0, -1, withscores=True)

    assert reap(loaded_client, key) == 0

    assert loaded_client.zrange(key, 0, -1, withscores=True) == before


def test_reap_missing_key_returns_0(loaded_client, key):
    assert reap(loaded_client, key) == 0
    assert loaded_client.exists(key) == 0


def test_reap_removes_ended_slots_of_library(loaded_client, key):
    acquire(loaded_client, key, "live", max_slots=3, timeout_ms=LONG_MS)
    acquire(loaded_client, key, "ended-1", max_slots=3, timeout_ms=SHORT_MS)
    acquire(loaded_client, key, "ended-2", max_slots=3, timeout_ms=SHORT_MS)
    wait_for_server_time(loaded_client, lease_end(loaded_client, key, "ended-2"))

    assert reap(loaded_client, key) == 2

    assert loaded_client.zrange(key, 0, -1) == [b"live"]
    release(loaded_client, key, "live")
    assert loaded_client.exists(key) == 0


# runs_version ------------------------------------------------------------------


def test_version_returns_packaged_version(loaded_client):
    version = loaded_client.fcall_ro("runs_version", 0).decode()

    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert version == packaged_version()


def test_read_only_functions_run_under_fcall_ro(loaded_client, key):
    acquire(loaded_client, key, "t1")

    assert loaded_client.fcall_ro("runs_count", 1, key) == 1
    assert loaded_client.fcall_ro("runs_holders", 1, key)[0] == b"t1"


def test_write_functions_are_rejected_by_fcall_ro(loaded_client, key):
    with pytest.raises(redis.ResponseError):
        loaded_client.fcall_ro("runs_acquire", 1, key, 1, LONG_MS, "t1")

    assert loaded_client.exists(key) == 0


# TTL of the key ----------------------------------------------------------------


def test_acquire_sets_ttl_covering_longest_lease(loaded_client, key):
    acquire(loaded_client, key, "long", max_slots=2, timeout_ms=LONG_MS)
    assert_ttl_covers_leases(loaded_client, key)

    acquire(loaded_client, key, "short", max_slots=2, timeout_ms=5_000)
    assert_ttl_covers_leases(loaded_client, key)
    assert expire_time_ms(loaded_client, key) >= lease_end(loaded_client, key, "long")


def test_extend_shortening_keeps_ttl_covering(loaded_client, key):
    acquire(loaded_client, key, "a", max_slots=2, timeout_ms=LONG_MS)
    acquire(loaded_client, key, "b", max_slots=2, timeout_ms=30_000)

    extend(loaded_client, key, "a", 5_000)
    assert_ttl_covers_leases(loaded_client, key)
    assert expire_time_ms(loaded_client, key) >= lease_end(loaded_client, key, "b")

    extend(loaded_client, key, "b", 2_000)
    assert_ttl_covers_leases(loaded_client, key)


def test_extend_lengthening_lease_moves_ttl(loaded_client, key):
    acquire(loaded_client, key, "a", timeout_ms=5_000)

    extend(loaded_client, key, "a", LONG_MS)

    assert_ttl_covers_leases(loaded_client, key)
    assert expire_time_ms(loaded_client, key) >= lease_end(loaded_client, key, "a")


def test_release_of_longest_keeps_ttl_covering(loaded_client, key):
    acquire(loaded_client, key, "long", max_slots=3, timeout_ms=LONG_MS)
    acquire(loaded_client, key, "mid", max_slots=3, timeout_ms=30_000)
    acquire(loaded_client, key, "short", max_slots=3, timeout_ms=5_000)

    release(loaded_client, key, "long")
    assert_ttl_covers_leases(loaded_client, key)

    release(loaded_client, key, "short")
    assert_ttl_covers_leases(loaded_client, key)


def test_wait_sets_ttl_covering_waiter_lease(loaded_client, key):
    acquire(loaded_client, key, "holder", timeout_ms=5_000)

    wait_in_line(loaded_client, key, "waiter", wait_lease_ms=LONG_MS)

    assert_ttl_covers_leases(loaded_client, key)


def test_release_of_last_slot_deletes_key(loaded_client, key):
    acquire(loaded_client, key, "t1", max_slots=2)
    acquire(loaded_client, key, "t2", max_slots=2)

    release(loaded_client, key, "t1")
    release(loaded_client, key, "t2")

    assert loaded_client.exists(key) == 0


def test_key_expires_when_its_leases_end(loaded_client, key):
    acquire(loaded_client, key, "t1", timeout_ms=SHORT_MS)
    wait_for_server_time(loaded_client, lease_end(loaded_client, key, "t1"))

    deadline = time.monotonic() + 5
    while loaded_client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loaded_client.exists(key) == 0


# MAX_SLOTS changes -------------------------------------------------------------


def test_lowering_max_slots_never_evicts_holders(loaded_client, key):
    for token in ("t1", "t2", "t3"):
        assert acquire(loaded_client, key, token, max_slots=3) == 1

    assert acquire(loaded_client, key, "new", max_slots=1) == 0
    assert count(loaded_client, key) == 3
    for token in ("t1", "t2", "t3"):
        assert extend(loaded_client, key, token, LONG_MS) == 1

    release(loaded_client, key, "t1")
    release(loaded_client, key, "t2")
    assert acquire(loaded_client, key, "new", max_slots=1) == 0

    release(loaded_client, key, "t3")
    assert acquire(loaded_client, key, "new", max_slots=1) == 1


def test_acquire_renews_holder_over_lowered_limit(loaded_client, key):
    acquire(loaded_client, key, "t1", max_slots=2)
    acquire(loaded_client, key, "t2", max_slots=2)

    assert acquire(loaded_client, key, "t2", max_slots=1) == 1

    assert count(loaded_client, key) == 2


# Bad arguments -----------------------------------------------------------------

TOO_LONG_TOKEN = "x" * 257

# (function, numkeys, keys, args, words the message must contain)
BAD_CALLS = [
    # runs_acquire
    ("runs_acquire", 0, [], [1, LONG_MS, "t"], "keys"),
    ("runs_acquire", 2, ["{k}", "other"], [1, LONG_MS, "t"], "keys"),
    ("runs_acquire", 1, ["{k}"], [1, LONG_MS], "arguments"),
    ("runs_acquire", 1, ["{k}"], [1, LONG_MS, "t", "extra"], "arguments"),
    ("runs_acquire", 1, ["{k}"], ["0", LONG_MS, "t"], "MAX_SLOTS"),
    ("runs_acquire", 1, ["{k}"], ["-1", LONG_MS, "t"], "MAX_SLOTS"),
    ("runs_acquire", 1, ["{k}"], ["1.5", LONG_MS, "t"], "MAX_SLOTS"),
    ("runs_acquire", 1, ["{k}"], ["abc", LONG_MS, "t"], "MAX_SLOTS"),
    ("runs_acquire", 1, ["{k}"], ["1e3", LONG_MS, "t"], "MAX_SLOTS"),
    ("runs_acquire", 1, ["{k}"], [" 7", LONG_MS, "t"], "MAX_SLOTS"),
    ("runs_acquire", 1, ["{k}"], ["", LONG_MS, "t"], "MAX_SLOTS"),
    ("runs_acquire", 1, ["{k}"], [str(2**31), LONG_MS, "t"], "MAX_SLOTS"),
    ("runs_acquire", 1, ["{k}"], [1, "0", "t"], "TIMEOUT_MS"),
    ("runs_acquire", 1, ["{k}"], [1, "-5", "t"], "TIMEOUT_MS"),
    ("runs_acquire", 1, ["{k}"], [1, "abc", "t"], "TIMEOUT_MS"),
    ("runs_acquire", 1, ["{k}"], [1, "2.5", "t"], "TIMEOUT_MS"),
    ("runs_acquire", 1, ["{k}"], [1, str(MAX_TIMEOUT_MS + 1), "t"], "TIMEOUT_MS"),
    ("runs_acquire", 1, ["{k}"], [1, "1" + "0" * 20, "t"], "TIMEOUT_MS"),
    ("runs_acquire", 1, ["{k}"], [1, LONG_MS, ""], "TOKEN"),
    ("runs_acquire", 1, ["{k}"], [1, LONG_MS, TOO_LONG_TOKEN], "TOKEN"),
    # runs_wait
    ("runs_wait", 1, ["{k}"], [1, LONG_MS, "t"], "arguments"),
    ("runs_wait", 2, ["{k}", "other"], [1, LONG_MS, "t", LONG_MS], "keys"),
    ("runs_wait", 1, ["{k}"], ["0", LONG_MS, "t", LONG_MS], "MAX_SLOTS"),
    ("runs_wait", 1, ["{k}"], [1, "-5", "t", LONG_MS], "TIMEOUT_MS"),
    ("runs_wait", 1, ["{k}"], [1, LONG_MS, "", LONG_MS], "TOKEN"),
    ("runs_wait", 1, ["{k}"], [1, LONG_MS, TOO_LONG_TOKEN, LONG_MS], "TOKEN"),
    ("runs_wait", 1, ["{k}"], [1, LONG_MS, "t", "0"], "WAIT_LEASE_MS"),
    ("runs_wait", 1, ["{k}"], [1, LONG_MS, "t", "abc"], "WAIT_LEASE_MS"),
    ("runs_wait", 1, ["{k}"], [1, LONG_MS, "t", str(MAX_TIMEOUT_MS + 1)], "WAIT_LEASE_MS"),
    # runs_release
    ("runs_release", 0, [], ["holder-1"], "keys"),
    ("runs_release", 1, ["{k}"], [], "arguments"),
    ("runs_release", 1, ["{k}"], ["holder-1", "extra"], "arguments"),
    ("runs_release", 1, ["{k}"], [""], "TOKEN"),
    ("runs_release", 1, ["{k}"], [TOO_LONG_TOKEN], "TOKEN"),
    # runs_extend
    ("runs_extend", 2, ["{k}", "other"], ["holder-1", LONG_MS], "keys"),
    ("runs_extend", 1, ["{k}"], ["holder-1"], "arguments"),
    ("runs_extend", 1, ["{k}"], ["holder-1", LONG_MS, "extra"], "arguments"),
    ("runs_extend", 1, ["{k}"], ["holder-1", "0"], "TIMEOUT_MS"),
    ("runs_extend", 1, ["{k}"], ["holder-1", "-5"], "TIMEOUT_MS"),
    ("runs_extend", 1, ["{k}"], ["holder-1", "abc"], "TIMEOUT_MS"),
    ("runs_extend", 1, ["{k}"], ["holder-1", str(MAX_TIMEOUT_MS + 1)], "TIMEOUT_MS"),
    ("runs_extend", 1, ["{k}"], ["", LONG_MS], "TOKEN"),
    ("runs_extend", 1, ["{k}"], [TOO_LONG_TOKEN, LONG_MS], "TOKEN"),
    # runs_reap
    ("runs_reap", 0, [], [], "keys"),
    ("runs_reap", 1, ["{k}"], ["extra"], "arguments"),
    # read-only functions
    ("runs_count", 2, ["{k}", "other"], [], "keys"),
    ("runs_count", 1, ["{k}"], ["extra"], "arguments"),
    ("runs_holders", 0, [], [], "keys"),
    ("runs_holders", 1, ["{k}"], ["0"], "LIMIT"),
    ("runs_holders", 1, ["{k}"], ["abc"], "LIMIT"),
    ("runs_holders", 1, ["{k}"], [1, 2], "arguments"),
    ("runs_version", 1, ["{k}"], [], "keys"),
    ("runs_version", 0, [], ["extra"], "arguments"),
]

READ_ONLY_FUNCTIONS = {"runs_count", "runs_holders", "runs_version"}


def bad_call_id(case) -> str:
    name, numkeys, _keys, args, word = case
    labels = [arg if len(str(arg)) <= 12 else f"{str(arg)[:6]}..{len(str(arg))}" for arg in args]
    return f"{name}-{numkeys}keys-{word}-{labels}"


@pytest.fixture
def busy_key(loaded_client, key):
    """A key with two live slots, a waiter in line and an ended slot."""
    acquire(loaded_client, key, "holder-1", max_slots=2)
    acquire(loaded_client, key, "holder-2", max_slots=2)
    assert wait_in_line(loaded_client, key, "waiter", max_slots=2)[0] == 0
    loaded_client.zadd(key, {"ended": 1_000})
    return key


@pytest.mark.parametrize("case", BAD_CALLS, ids=[bad_call_id(case) for case in BAD_CALLS])
def test_bad_arguments_get_err_reply_and_change_nothing(loaded_client, busy_key, case):
    name, numkeys, keys, args, word = case
    keys = [busy_key if part == "{k}" else part for part in keys]
    fcall = loaded_client.fcall_ro if name in READ_ONLY_FUNCTIONS else loaded_client.fcall
    command = "FCALL_RO" if name in READ_ONLY_FUNCTIONS else "FCALL"
    before = key_state(loaded_client, busy_key)

    with pytest.raises(redis.ResponseError) as raised:
        fcall(name, numkeys, *keys, *args)
    line = raw_first_line(loaded_client, command, name, numkeys, *keys, *args)

    assert line.startswith(b"-ERR "), line
    assert word.encode() in line, line
    # redis-py drops the "ERR " error code from the message text.
    assert word in str(raised.value)
    assert key_state(loaded_client, busy_key) == before
    assert loaded_client.exists("other") == 0


def test_token_naming_waiter_entry_is_rejected(loaded_client, busy_key):
    before = key_state(loaded_client, busy_key)
    crafted = WAITER_LEASE_PREFIX + b"waiter"

    with pytest.raises(redis.ResponseError, match="TOKEN"):
        acquire(loaded_client, busy_key, crafted, max_slots=5)
    with pytest.raises(redis.ResponseError, match="TOKEN"):
        release(loaded_client, busy_key, crafted)
    with pytest.raises(redis.ResponseError, match="TOKEN"):
        extend(loaded_client, busy_key, crafted, LONG_MS)

    assert key_state(loaded_client, busy_key) == before


def test_acquire_wrong_type_key_fails_unchanged(loaded_client, key):
    loaded_client.set(key, "not a sorted set")

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        acquire(loaded_client, key, "t1")

    assert loaded_client.get(key) == b"not a sorted set"


# Bounded cleanup ---------------------------------------------------------------

ENDED_SLOTS = 2_000


@pytest.fixture
def key_with_ended_slots(loaded_client, key):
    loaded_client.zadd(key, {f"ended-{i}": 1_000 + i for i in range(ENDED_SLOTS)})
    return key


def ended_removed(client, key, call) -> tuple[int, int]:
    """Run `call`; return its reply and how many ended slots it removed."""
    ended_before = client.zcount(key, "-inf", 10_000)
    result = call()
    ended_after = client.zcount(key, "-inf", 10_000)
    return result, ended_before - ended_after


def test_acquire_removes_at_most_16_ended_slots(loaded_client, key_with_ended_slots):
    key = key_with_ended_slots

    granted, removed = ended_removed(
        loaded_client, key, lambda: acquire(loaded_client, key, "t1", max_slots=1)
    )

    assert granted == 1
    assert removed <= CLEANUP_BATCH
    assert loaded_client.zcard(key) == ENDED_SLOTS - removed + 1
    assert count(loaded_client, key) == 1
    assert [token for token, _ in holders(loaded_client, key)] == [b"t1"]
    assert_ttl_covers_leases(loaded_client, key)


def test_every_write_removes_at_most_16_ended_slots(loaded_client, key_with_ended_slots):
    key = key_with_ended_slots
    calls = [
        (lambda: acquire(loaded_client, key, "t1", max_slots=2), 1),
        (lambda: acquire(loaded_client, key, "t2", max_slots=2), 1),
        (lambda: acquire(loaded_client, key, "t3", max_slots=2), 0),
        (lambda: wait_in_line(loaded_client, key, "w1", max_slots=2)[0], 0),
        (lambda: extend(loaded_client, key, "t1", LONG_MS), 1),
        (lambda: extend(loaded_client, key, "stranger", LONG_MS), 0),
        (lambda: release(loaded_client, key, "t2"), 1),
        (lambda: release(loaded_client, key, "stranger"), 0),
    ]
    total_removed = 0

    for call, expected in calls:
        result, removed = ended_removed(loaded_client, key, call)
        assert result == expected
        assert removed <= CLEANUP_BATCH
        total_removed += removed

    assert loaded_client.zcount(key, "-inf", 10_000) == ENDED_SLOTS - total_removed
    assert count(loaded_client, key) == 1
    assert_ttl_covers_leases(loaded_client, key)


# runs_wait and the line of waiters ---------------------------------------------


def test_wait_free_slot_grants_it(loaded_client, key):
    assert wait_in_line(loaded_client, key, "w1", max_slots=1) == [1, 0, 0]

    assert count(loaded_client, key) == 1
    assert loaded_client.zscore(key, WAITER_LEASE_PREFIX + b"w1") is None


def test_wait_full_key_returns_place_and_next_end(loaded_client, key):
    acquire(loaded_client, key, "holder", max_slots=1, timeout_ms=20_000)

    granted, ahead, next_end_ms = wait_in_line(loaded_client, key, "w1", max_slots=1)

    assert granted == 0
    assert ahead == 0
    assert 0 < next_end_ms <= 20_000
    assert count(loaded_client, key) == 1


def test_wait_serves_waiters_in_arrival_order(loaded_client, key):
    acquire(loaded_client, key, "holder", max_slots=1)
    assert wait_in_line(loaded_client, key, "w1", max_slots=1)[:2] == [0, 0]
    assert wait_in_line(loaded_client, key, "w2", max_slots=1)[:2] == [0, 1]
    assert wait_in_line(loaded_client, key, "w3", max_slots=1)[:2] == [0, 2]

    release(loaded_client, key, "holder")

    # Calling again keeps each waiter's place; only the first is served.
    assert wait_in_line(loaded_client, key, "w3", max_slots=1)[:2] == [0, 2]
    assert wait_in_line(loaded_client, key, "w2", max_slots=1)[:2] == [0, 1]
    assert wait_in_line(loaded_client, key, "w1", max_slots=1) == [1, 0, 0]

    release(loaded_client, key, "w1")
    assert wait_in_line(loaded_client, key, "w3", max_slots=1)[:2] == [0, 1]
    assert wait_in_line(loaded_client, key, "w2", max_slots=1) == [1, 0, 0]


def test_acquire_does_not_jump_ahead_of_live_waiter(loaded_client, key):
    acquire(loaded_client, key, "holder", max_slots=1)
    wait_in_line(loaded_client, key, "w1", max_slots=1)
    release(loaded_client, key, "holder")

    assert acquire(loaded_client, key, "jumper", max_slots=1) == 0

    assert count(loaded_client, key) == 0
    assert wait_in_line(loaded_client, key, "w1", max_slots=1) == [1, 0, 0]


def test_acquire_spare_slot_beside_waiter(loaded_client, key):
    acquire(loaded_client, key, "holder", max_slots=1)
    wait_in_line(loaded_client, key, "w1", max_slots=1)

    # With room for the holder and the waiter, a third slot is free.
    assert acquire(loaded_client, key, "t2", max_slots=3) == 1


def test_wait_place_ends_with_wait_lease(loaded_client, key):
    acquire(loaded_client, key, "holder", max_slots=1)
    wait_in_line(loaded_client, key, "w1", max_slots=1, wait_lease_ms=SHORT_MS)
    place_end = int(loaded_client.zscore(key, WAITER_LEASE_PREFIX + b"w1")) - 2**46
    release(loaded_client, key, "holder")
    assert acquire(loaded_client, key, "jumper", max_slots=1) == 0

    wait_for_server_time(loaded_client, place_end)

    assert acquire(loaded_client, key, "later", max_slots=1) == 1


def test_wait_ended_place_does_not_stand_ahead(loaded_client, key):
    acquire(loaded_client, key, "holder", max_slots=1)
    wait_in_line(loaded_client, key, "gone", max_slots=1, wait_lease_ms=SHORT_MS)
    place_end = int(loaded_client.zscore(key, WAITER_LEASE_PREFIX + b"gone")) - 2**46
    wait_for_server_time(loaded_client, place_end)

    assert wait_in_line(loaded_client, key, "w2", max_slots=1)[:2] == [0, 0]

    release(loaded_client, key, "holder")
    assert wait_in_line(loaded_client, key, "w2", max_slots=1) == [1, 0, 0]


def test_release_of_waiting_token_removes_its_place(loaded_client, key):
    acquire(loaded_client, key, "holder", max_slots=1)
    wait_in_line(loaded_client, key, "w1", max_slots=1)

    assert release(loaded_client, key, "w1") == 0

    assert loaded_client.zscore(key, WAITER_LEASE_PREFIX + b"w1") is None
    assert loaded_client.zscore(key, WAITER_ORDER_PREFIX + b"w1") is None
    release(loaded_client, key, "holder")
    assert acquire(loaded_client, key, "t2", max_slots=1) == 1


def test_wait_granted_token_leaves_line(loaded_client, key):
    acquire(loaded_client, key, "holder", max_slots=1)
    wait_in_line(loaded_client, key, "w1", max_slots=1)
    release(loaded_client, key, "holder")

    assert wait_in_line(loaded_client, key, "w1", max_slots=1) == [1, 0, 0]

    assert loaded_client.zrange(key, 0, -1) == [b"w1"]


@pytest.fixture
def channel(loaded_client, key):
    """A sharded subscription to the key's channel, confirmed before use."""
    pubsub = loaded_client.pubsub()
    pubsub.ssubscribe(key)
    confirmation = pubsub.get_sharded_message(timeout=5)
    assert confirmation is not None
    assert confirmation["type"] == "ssubscribe"
    yield pubsub
    pubsub.close()


def next_message(pubsub):
    return pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=5)


def test_release_wakes_first_waiter_with_its_token(loaded_client, key, channel):
    acquire(loaded_client, key, "holder")
    wait_in_line(loaded_client, key, "w1")
    wait_in_line(loaded_client, key, "w2")

    release(loaded_client, key, "holder")

    message = next_message(channel)
    assert message is not None
    assert message["channel"] == key.encode()
    assert message["data"] == b"w1"


def test_release_of_waiting_token_wakes_next_waiter(loaded_client, key, channel):
    acquire(loaded_client, key, "holder")
    wait_in_line(loaded_client, key, "w1")
    wait_in_line(loaded_client, key, "w2")

    release(loaded_client, key, "w1")

    message = next_message(channel)
    assert message is not None
    assert message["data"] == b"w2"


def test_release_without_waiters_publishes_nothing(loaded_client, key, channel):
    acquire(loaded_client, key, "t1")

    release(loaded_client, key, "t1")
    loaded_client.execute_command("SPUBLISH", key, "marker")

    # Messages arrive in order, so the marker comes first unless the release published.
    message = next_message(channel)
    assert message is not None
    assert message["data"] == b"marker"


def test_release_of_nothing_publishes_nothing(loaded_client, key, channel):
    acquire(loaded_client, key, "t1")
    wait_in_line(loaded_client, key, "w1")

    release(loaded_client, key, "stranger")
    loaded_client.execute_command("SPUBLISH", key, "marker")

    message = next_message(channel)
    assert message is not None
    assert message["data"] == b"marker"


def test_reap_of_ended_slot_wakes_first_waiter(loaded_client, key, channel):
    acquire(loaded_client, key, "holder")
    wait_in_line(loaded_client, key, "w1")
    loaded_client.zadd(key, {"ended": 1_000})

    assert reap(loaded_client, key) == 1

    message = next_message(channel)
    assert message is not None
    assert message["data"] == b"w1"


def test_wait_grant_with_room_left_wakes_next_waiter(loaded_client, key, channel):
    acquire(loaded_client, key, "h1", max_slots=2)
    acquire(loaded_client, key, "h2", max_slots=2)
    wait_in_line(loaded_client, key, "w1", max_slots=2)
    wait_in_line(loaded_client, key, "w2", max_slots=2)
    release(loaded_client, key, "h1")
    release(loaded_client, key, "h2")
    assert next_message(channel)["data"] == b"w1"
    assert next_message(channel)["data"] == b"w1"

    assert wait_in_line(loaded_client, key, "w1", max_slots=2)[0] == 1

    message = next_message(channel)
    assert message is not None
    assert message["data"] == b"w2"
