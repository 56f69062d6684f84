"""The limiter under faults: killed holders, restarts, freezes, flushes, full memory."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

from concurrent_runs import (
    ConcurrentRunsError,
    ConcurrentRunsLimiter,
    LimiterUnavailableError,
    SlotLimitReachedError,
)
from concurrent_runs.library import FN_EXTEND, FN_REAP, FN_RELEASE, LIBRARY_NAME

from servers import RedisServer

PREFIX = "concurrent_runs:"
SOCKET_TIMEOUT_S = 0.3
# Tries of one failing call: two by the library times two by redis-py's Retry.
TRIES_PER_CALL = 4
# A call may first check the library version, which fails the same way.
CALLS_PER_OPERATION = 2
BACKOFF_ALLOWANCE_S = 1.0


def unavailable_bound_s(socket_timeout: float) -> float:
    """Return the longest a call to an unreachable Redis may take before it raises."""
    return CALLS_PER_OPERATION * TRIES_PER_CALL * socket_timeout + BACKOFF_ALLOWANCE_S


def server_ms(client: redis.Redis) -> int:
    seconds, microseconds = client.time()
    return seconds * 1000 + microseconds // 1000


def timed_call(function, *args, **kwargs):
    """Run function; return (its result or the exception raised, seconds taken)."""
    started = time.monotonic()
    try:
        outcome = function(*args, **kwargs)
    except Exception as exc:
        outcome = exc
    return outcome, time.monotonic() - started


def library_names(client: redis.Redis) -> list[bytes]:
    return [dict(zip(entry[::2], entry[1::2]))[b"library_name"]
            for entry in client.function_list()]


HOLDER_SCRIPT = """
import sys, time
from concurrent_runs import ConcurrentRunsLimiter
limiter = ConcurrentRunsLimiter(sys.argv[1], slot_timeout=float(sys.argv[3]))
with limiter.slot(sys.argv[2], 1, renew=True) as token:
    print(token, flush=True)
    time.sleep(120)
"""


class TestKilledHolder:
    def test_renewing_holder_killed_slot_frees_after_last_lease(self, server_folder):
        slot_timeout = 1.0
        key = f"killed-{uuid.uuid4().hex[:8]}"
        with RedisServer(server_folder) as server:
            admin = server.client()
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER_SCRIPT, server.url, key, str(slot_timeout)],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                token = holder.stdout.readline().strip()
                assert token, "the holder printed no token"
                # Renewal keeps the slot past its first lease while the holder lives.
                first_lease_end = int(admin.zscore(PREFIX + key, token))
                while server_ms(admin) <= first_lease_end + 50:
                    time.sleep(0.05)
                assert admin.zscore(PREFIX + key, token) is not None
                assert int(admin.zscore(PREFIX + key, token)) > first_lease_end

                holder.send_signal(signal.SIGKILL)
                holder.wait(timeout=10)
            finally:
                if holder.poll() is None:
                    holder.kill()
                    holder.wait()
                holder.stdout.close()
            assert holder.returncode == -signal.SIGKILL

            last_lease_end = int(admin.zscore(PREFIX + key, token))
            with ConcurrentRunsLimiter(server.url, slot_timeout=30) as limiter:
                successor = limiter.acquire(key, 1, wait=10)
                granted_at = server_ms(admin)
                assert successor is not None
                assert granted_at >= last_lease_end
                assert list(limiter.get_holders(key)) == [successor]
            admin.close()


class TestRestart:
    def test_restart_with_aof_keeps_slots_and_library(self, server_folder):
        key = "restarted"
        options = ["--appendonly", "yes", "--appendfsync", "always"]
        with RedisServer(server_folder, extra_args=options) as server:
            limiter = ConcurrentRunsLimiter(
                server.url, slot_timeout=60, socket_timeout=SOCKET_TIMEOUT_S
            )
            token = limiter.acquire(key, 2)
            assert token is not None

            server.stop()
            try:
                outcome, seconds = timed_call(limiter.acquire, key, 2)
            finally:
                server.start()
            assert isinstance(outcome, LimiterUnavailableError)
            assert seconds < unavailable_bound_s(SOCKET_TIMEOUT_S)

            admin = server.client()
            assert library_names(admin) == [LIBRARY_NAME.encode()]
            assert limiter.get_count(key) == 1
            assert list(limiter.get_holders(key)) == [token]
            assert limiter.acquire(key, 2) is not None
            assert limiter.acquire(key, 2) is None
            assert limiter.release(key, token) is True
            admin.close()
            limiter.close()

    def test_stopped_redis_calls_raise_unavailable_quickly(self, server_folder):
        key = "stopped"
        with RedisServer(server_folder) as server:
            limiter = ConcurrentRunsLimiter(
                server.url, slot_timeout=60, socket_timeout=SOCKET_TIMEOUT_S
            )
            token = limiter.acquire(key, 2)
            assert token is not None
            server.stop()
            try:
                calls = {
                    "acquire": (limiter.acquire, key, 2),
                    "acquire with wait": (limiter.acquire, key, 2, 1.0),
                    "release": (limiter.release, key, token),
                    "extend": (limiter.extend, key, token),
                    "get_count": (limiter.get_count, key),
                    "get_holders": (limiter.get_holders, key),
                }
                for name, (function, *args) in calls.items():
                    outcome, seconds = timed_call(function, *args)
                    assert isinstance(outcome, LimiterUnavailableError), name
                    assert seconds < unavailable_bound_s(SOCKET_TIMEOUT_S), name
            finally:
                server.start()
            # Without persistence the server came back empty, and the wrapper
            # loads the library again by itself.
            assert limiter.get_count(key) == 0
            assert limiter.acquire(key, 2) is not None
            limiter.close()

    def test_stopped_redis_fail_open_grants_token(self, server_folder, caplog):
        key = "stopped-open"
        with RedisServer(server_folder) as server:
            limiter = ConcurrentRunsLimiter(
                server.url, fail_open=True, socket_timeout=SOCKET_TIMEOUT_S
            )
            assert limiter.get_count(key) == 0
            server.stop()
            try:
                token, seconds = timed_call(limiter.acquire, key, 1)
                released, _ = timed_call(limiter.release, key, token)
            finally:
                server.start()
            assert isinstance(token, str)
            assert seconds < unavailable_bound_s(SOCKET_TIMEOUT_S)
            assert released is False
            assert "fail_open is on" in caplog.text
            limiter.close()


class TestFrozenServer:
    def test_frozen_redis_fails_fast_counts_slots_once(self, server_folder):
        key = "frozen"
        with RedisServer(server_folder) as server:
            limiter = ConcurrentRunsLimiter(
                server.url, slot_timeout=60, socket_timeout=SOCKET_TIMEOUT_S
            )
            held = limiter.acquire(key, 2)
            assert held is not None

            server.signal(signal.SIGSTOP)
            try:
                acquired, acquire_s = timed_call(limiter.acquire, key, 2)
                extended, extend_s = timed_call(limiter.extend, key, held)
                counted, count_s = timed_call(limiter.get_count, key)
            finally:
                server.signal(signal.SIGCONT)

            bound_s = unavailable_bound_s(SOCKET_TIMEOUT_S)
            assert isinstance(acquired, LimiterUnavailableError)
            assert acquire_s < bound_s
            assert isinstance(extended, LimiterUnavailableError)
            assert extend_s < bound_s
            assert isinstance(counted, LimiterUnavailableError)
            assert count_s < bound_s

            # The acquire that raised may still run once Redis thaws; its slot
            # must not keep the caller's next acquire out.
            successor = limiter.acquire(key, 2)
            assert successor is not None
            assert sorted(limiter.get_holders(key)) == sorted([held, successor])
            assert limiter.acquire(key, 2) is None
            assert limiter.release(key, held) is True
            assert limiter.release(key, successor) is True
            assert limiter.get_count(key) == 0
            limiter.close()


class TestFlushes:
    def test_flushes_during_work_library_comes_back(self, server_folder):
        workers = 4
        rounds = 150
        key = "flushed"
        with RedisServer(server_folder) as server:
            limiter = ConcurrentRunsLimiter(server.url, slot_timeout=5)
            admin = server.client()
            unexplained: list[BaseException] = []
            finished = threading.Event()

            def work(seed: int) -> None:
                rng = random.Random(seed)
                try:
                    for _ in range(rounds):
                        try:
                            with limiter.slot(key, 2, wait=rng.choice([None, 0.05])):
                                limiter.get_count(key)
                                time.sleep(rng.uniform(0, 0.005))
                        except SlotLimitReachedError:
                            pass
                except BaseException as exc:
                    unexplained.append(exc)

            def flush() -> None:
                rng = random.Random(1)
                while not finished.is_set():
                    if rng.random() < 0.5:
                        admin.function_flush()
                    else:
                        admin.flushall()
                    time.sleep(rng.uniform(0.005, 0.02))

            flusher = threading.Thread(target=flush)
            threads = [threading.Thread(target=work, args=(seed,)) for seed in range(workers)]
            flusher.start()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            finished.set()
            flusher.join()

            assert unexplained == []
            loads = admin.info("commandstats")["cmdstat_function|load"]["calls"]
            assert loads > 1, "the workers never had to load the library again"
            admin.function_flush()
            token = limiter.acquire(key, 2)
            assert token is not None
            assert library_names(admin) == [LIBRARY_NAME.encode()]
            admin.close()
            limiter.close()


class TestFullMemory:
    def test_full_memory_rejects_acquire_but_frees_slots(self, server_folder):
        with RedisServer(server_folder) as server:
            admin = server.client()
            limiter = ConcurrentRunsLimiter(server.url, slot_timeout=60)
            token = limiter.acquire("full", 2)
            assert token is not None
            short = ConcurrentRunsLimiter(client=admin, slot_timeout=0.05)
            assert short.acquire("full", 2) is not None

            used = admin.info("memory")["used_memory"]
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", used + 256 * 1024)
            filler = 0
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                while True:
                    admin.set(f"filler:{filler}", "x" * 1024)
                    filler += 1
            # Keep memory above the limit whatever Redis frees from here on.
            admin.config_set("maxmemory", admin.info("memory")["used_memory"] // 2)
            time.sleep(0.1)  # the short lease ends

            with pytest.raises(ConcurrentRunsError) as refused:
                limiter.acquire("full", 2)
            message = str(refused.value)
            assert not isinstance(refused.value, LimiterUnavailableError)
            assert "out of memory" in message
            assert "maxmemory" in message
            with pytest.raises(ConcurrentRunsError, match="out of memory"):
                limiter.acquire("full", 2, wait=0.2)

            assert admin.fcall(FN_REAP, 1, PREFIX + "full") == 1
            assert limiter.extend("full", token) is True
            assert limiter.get_count("full") == 1
            assert limiter.release("full", token) is True
            assert limiter.get_count("full") == 0
            admin.close()
            limiter.close()

    def test_slot_freeing_functions_are_flagged_allow_oom(self, loaded_client):
        (library,) = loaded_client.function_list(library=LIBRARY_NAME)
        functions = dict(zip(library[::2], library[1::2]))[b"functions"]
        flags = {
            dict(zip(entry[::2], entry[1::2]))[b"name"].decode():
                dict(zip(entry[::2], entry[1::2]))[b"flags"]
            for entry in functions
        }

        for name in (FN_RELEASE, FN_EXTEND, FN_REAP):
            assert b"allow-oom" in flags[name], name


class TestKeysNearExpiry:
    def test_key_ttl_ending_with_lease_keeps_live_slots(self, loaded_client):
        rng = random.Random(5)
        redis_key = f"{PREFIX}expiring-{uuid.uuid4().hex[:8]}"
        boundary_steps = 0
        for round_number in range(120):
            tokens = [f"a{round_number}", f"b{round_number}"]
            for token in tokens:
                lease_ms = rng.randint(1, 4)
                acquired = loaded_client.fcall(
                    "runs_acquire", 1, redis_key, 3, lease_ms, token
                )
                assert acquired == 1
            # Step across the lease ends. Each of the first steps renews one
            # token; every step reads the key's state in the same transaction,
            # so nothing runs in between.
            for step in range(200):
                token = rng.choice(tokens)
                lease_ms = rng.randint(1, 3)
                pipe = loaded_client.pipeline(transaction=True)
                pipe.time()
                if step < 20 and rng.random() < 0.5:
                    pipe.fcall("runs_extend", 1, redis_key, token, lease_ms)
                elif step < 20:
                    pipe.fcall("runs_acquire", 1, redis_key, 3, lease_ms, token)
                else:
                    pipe.fcall_ro("runs_count", 1, redis_key)
                pipe.zscore(redis_key, token)
                pipe.pexpiretime(redis_key)
                pipe.zrange(redis_key, 0, -1, withscores=True)
                pipe.time()
                before, reply, score, expire_at, entries, after = pipe.execute()
                before_ms = before[0] * 1000 + before[1] // 1000
                after_ms = after[0] * 1000 + after[1] // 1000
                state = f"round {round_number}: {entries} expire at {expire_at}"

                assert expire_at != -1, f"key left without a TTL; {state}"
                for _, lease_end in entries:
                    if lease_end > after_ms:
                        assert expire_at >= lease_end, f"key expires first; {state}"
                if step >= 20:
                    # The count ran at a moment between the two TIME readings.
                    surely_live = sum(end > after_ms for _, end in entries)
                    maybe_live = sum(end > before_ms for _, end in entries)
                    assert surely_live <= reply <= maybe_live, state
                elif reply == 1 and score is None:
                    # Gone only if the new lease may have ended already.
                    assert after_ms >= before_ms + lease_ms, f"lost {token}; {state}"
                elif reply == 1 and score is not None:
                    assert score >= before_ms + lease_ms, state
                if abs(after_ms - expire_at) <= 1:
                    boundary_steps += 1
                if not any(lease_end > after_ms for _, lease_end in entries):
                    break
        assert boundary_steps > 0, "no step came within 1 ms of the key's expiry"
