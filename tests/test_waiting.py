"""Waiting for a slot: woken by releases, bounded in time, served in arrival order.

A waiter keeps a place in line in the key's sorted set (see the header of
functions/concurrent_runs.lua): a lease entry ``"\\0l" + TOKEN`` and an order
entry ``"\\0q" + TOKEN``. These tests read those entries to tell when a waiter
has entered the line and to check that nothing is left behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest
import redis

import concurrent_runs.client
from concurrent_runs import (
    ConcurrentRunsLimiter,
    SlotLimitReachedError,
    _core,
    acquire_slot,
    get_concurrent_limiter,
)
from servers import RedisServer

WAITER_LEASE_PREFIX = b"\0l"
WAITER_ORDER_PREFIX = b"\0q"
LEASE_BASE = 2**46  # score offset of waiter lease entries in the Lua library

# Gap between the moments two waiters enter the line in the fairness tests.
# The order is promised for waiters that begin at least 20 ms apart.
ARRIVAL_GAP_S = 0.05
WAITER_COUNT = 4


# Helpers shared with test_async.py -------------------------------------------


def redis_key(key: str) -> str:
    return _core.DEFAULT_KEY_PREFIX + key


def waiter_members(client: redis.Redis, key: str) -> list[bytes]:
    """Return the waiter entries (lease and order members) of a logical key."""
    members = client.zrange(redis_key(key), 0, -1)
    return [m for m in members if m.startswith((WAITER_LEASE_PREFIX, WAITER_ORDER_PREFIX))]


def waiter_lease_ends_ms(client: redis.Redis, key: str) -> dict[bytes, int]:
    """Return each waiter's token and the server time (ms) its place lease ends."""
    entries = client.zrange(redis_key(key), 0, -1, withscores=True)
    return {
        member[len(WAITER_LEASE_PREFIX) :]: int(score) - LEASE_BASE
        for member, score in entries
        if member.startswith(WAITER_LEASE_PREFIX)
    }


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` every few ms; return whether it came true in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


def server_ms(client: Any) -> int:
    seconds, microseconds = client.time()
    return seconds * 1000 + microseconds // 1000


def fcall_count(client: redis.Redis) -> int:
    """Return how many FCALL commands the server has run since it started."""
    stats = client.info("commandstats")
    return stats.get("cmdstat_fcall", {}).get("calls", 0)


def command_count(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


@pytest.fixture
def process_limiter_env(redis_url, loaded_client, monkeypatch):
    """Point the process-wide limiter at the test server, built afresh."""
    monkeypatch.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)
    monkeypatch.setattr(concurrent_runs.client, "_shared_limiter", None)
    yield monkeypatch
    shared = concurrent_runs.client._shared_limiter
    if shared is not None:
        shared.close()


# Waiter processes ------------------------------------------------------------


def wait_in_line_process(
    url: str,
    key: str,
    index: int,
    ready: Any,
    go: Any,
    grants: Any,
) -> None:
    """Wait for the one slot of ``key``; report the server time it was granted.

    Runs in a spawned process. The limiter connects and checks the library
    before ``ready`` is set, so that the first call after ``go`` is the wait.
    """
    limiter = ConcurrentRunsLimiter(url, slot_timeout=30)
    limiter.get_count(key)
    ready.set()
    go.wait()
    token = limiter.acquire(key, 1, wait=30)
    grants.put((index, server_ms(limiter.client) if token else None))
    if token is not None:
        time.sleep(0.02)
        limiter.release(key, token)
    limiter.close()


class WaiterProcesses:
    """Spawned waiter processes that enter the line of one key in a set order.

    ``target`` runs in each process with the arguments of wait_in_line_process.
    """

    def __init__(
        self,
        url: str,
        key: str,
        count: int,
        target: Callable[..., None] = wait_in_line_process,
    ) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.grants = self.context.Queue()
        self.readies = [self.context.Event() for _ in range(count)]
        self.gos = [self.context.Event() for _ in range(count)]
        self.processes = [
            self.context.Process(
                target=target,
                args=(url, key, index, self.readies[index], self.gos[index], self.grants),
                daemon=True,
            )
            for index in range(count)
        ]

    def start(self) -> None:
        for process in self.processes:
            process.start()
        for ready in self.readies:
            assert ready.wait(60), "a waiter process did not start"

    def join(self) -> list[int | None]:
        """Wait for every process to end; return their exit codes."""
        for process in self.processes:
            process.join(30)
        return [process.exitcode for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join(10)
        self.grants.close()
        self.grants.join_thread()


# Tests ---------------------------------------------------------------------


class TestWait:
    def test_wait_slot_released_wakes_waiter(self, limiter, loaded_client, key, monkeypatch):
        # With the fallback poll stretched to 30 s, only the release's message
        # can wake the waiter within the 10 s the test allows.
        monkeypatch.setattr(_core, "FALLBACK_POLL_S", 30.0)
        holder = limiter.acquire(key, 1)

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(limiter.acquire, key, 1, 30)
            assert wait_until(lambda: waiter_members(loaded_client, key))
            assert limiter.release(key, holder) is True
            token = waiting.result(timeout=10)

        assert token is not None
        assert limiter.get_holders(key).keys() == {token}
        assert waiter_members(loaded_client, key) == []

    def test_wait_time_up_returns_none(self, limiter, loaded_client, key):
        holder = limiter.acquire(key, 1)

        token = limiter.acquire(key, 1, wait=0.3)

        assert token is None
        assert limiter.get_holders(key).keys() == {holder}
        assert waiter_members(loaded_client, key) == []

    def test_slot_wait_time_up_raises_slot_limit_reached(self, limiter, loaded_client, key):
        limiter.acquire(key, 1)

        with pytest.raises(SlotLimitReachedError) as caught:
            with limiter.slot(key, 1, wait=0.3):
                pytest.fail("the block ran without a slot")

        assert caught.value.key == key
        assert caught.value.max_slots == 1
        assert caught.value.wait == 0.3
        assert isinstance(caught.value, RuntimeError)
        assert waiter_members(loaded_client, key) == []
        assert limiter.get_count(key) == 1

    def test_slot_wait_slot_released_enters_block(self, limiter, loaded_client, key):
        holder = limiter.acquire(key, 1)
        release_timer = threading.Timer(0.2, limiter.release, (key, holder))

        release_timer.start()
        try:
            with limiter.slot(key, 1, wait=10) as token:
                assert limiter.get_holders(key).keys() == {token}
        finally:
            release_timer.join()

        assert limiter.get_count(key) == 0
        assert waiter_members(loaded_client, key) == []

    def test_acquire_slot_wait_time_up_raises(
        self, process_limiter_env, loaded_client, key
    ):
        holder = get_concurrent_limiter().acquire(key, 1)

        with pytest.raises(SlotLimitReachedError) as caught:
            with acquire_slot(key, 1, wait=0.3):
                pytest.fail("the block ran without a slot")

        assert caught.value.wait == 0.3
        assert get_concurrent_limiter().get_holders(key).keys() == {holder}
        assert waiter_members(loaded_client, key) == []

    def test_wait_zero_tries_once(self, limiter, loaded_client, key):
        limiter.acquire(key, 1)

        assert limiter.acquire(key, 1, wait=0) is None
        assert waiter_members(loaded_client, key) == []

    def test_acquire_with_waiter_in_line_returns_none(self, limiter, loaded_client, key):
        holder = limiter.acquire(key, 1)

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(limiter.acquire, key, 1, 10)
            assert wait_until(lambda: waiter_members(loaded_client, key))
            assert limiter.release(key, holder) is True
            # The free slot is promised to the waiter, whether or not it has
            # taken it yet, so an acquire that did not wait gets nothing.
            jumped = limiter.acquire(key, 1)
            token = waiting.result(timeout=10)

        assert jumped is None
        assert token is not None
        assert limiter.get_holders(key).keys() == {token}

    def test_wait_full_key_calls_redis_rarely(self, server_folder, key):
        with RedisServer(server_folder) as server, server.client() as admin:
            limiter = ConcurrentRunsLimiter(server.url, slot_timeout=30)
            limiter.acquire(key, 1)
            fcalls_before = fcall_count(admin)
            subscribes_before = command_count(admin, "ssubscribe")

            token = limiter.acquire(key, 1, wait=2)

            fcalls = fcall_count(admin) - fcalls_before
            subscribes = command_count(admin, "ssubscribe") - subscribes_before
            limiter.close()

        assert token is None
        # The first try, one right after subscribing, about one poll a second
        # and the release that leaves the line: far below 5 calls a second.
        assert 2 <= fcalls <= 10
        assert subscribes == 1


class TestFairness:
    def test_waiters_get_slots_in_arrival_order(self, limiter, loaded_client, key):
        holder = limiter.acquire(key, 1)
        grant_order: list[int] = []

        def wait_then_hold(index: int) -> None:
            token = limiter.acquire(key, 1, wait=30)
            assert token is not None
            grant_order.append(index)
            time.sleep(0.02)
            limiter.release(key, token)

        with ThreadPoolExecutor(WAITER_COUNT) as pool:
            waiters = []
            for index in range(WAITER_COUNT):
                waiters.append(pool.submit(wait_then_hold, index))
                entries = 2 * (index + 1)
                assert wait_until(lambda: len(waiter_members(loaded_client, key)) == entries)
                time.sleep(ARRIVAL_GAP_S)
            assert limiter.release(key, holder) is True
            for waiter in waiters:
                waiter.result(timeout=30)

        assert grant_order == list(range(WAITER_COUNT))
        assert limiter.get_count(key) == 0
        assert waiter_members(loaded_client, key) == []

    def test_waiters_in_processes_get_slots_in_arrival_order(
        self, limiter, loaded_client, redis_url, key
    ):
        holder = limiter.acquire(key, 1)
        waiters = WaiterProcesses(redis_url, key, WAITER_COUNT)
        try:
            waiters.start()
            for index in range(WAITER_COUNT):
                waiters.gos[index].set()
                entries = 2 * (index + 1)
                assert wait_until(lambda: len(waiter_members(loaded_client, key)) == entries)
                time.sleep(ARRIVAL_GAP_S)
            assert limiter.release(key, holder) is True
            grants = [waiters.grants.get(timeout=30) for _ in range(WAITER_COUNT)]
            exit_codes = waiters.join()
        finally:
            waiters.stop()

        granted_at = {index: at for index, at in grants}
        assert exit_codes == [0] * WAITER_COUNT
        assert None not in granted_at.values()
        assert sorted(granted_at, key=granted_at.__getitem__) == list(range(WAITER_COUNT))
        assert limiter.get_count(key) == 0
        assert waiter_members(loaded_client, key) == []

    def test_waiter_timed_out_leaves_line_to_next(self, limiter, loaded_client, key):
        holder = limiter.acquire(key, 1)

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(limiter.acquire, key, 1, 0.5)
            assert wait_until(lambda: len(waiter_members(loaded_client, key)) == 2)
            time.sleep(ARRIVAL_GAP_S)
            second = pool.submit(limiter.acquire, key, 1, 30)
            assert first.result(timeout=10) is None
            # The first waiter left the line when its time was up; only the
            # second one's two entries remain.
            assert len(waiter_members(loaded_client, key)) == 2
            assert limiter.release(key, holder) is True
            token = second.result(timeout=10)

        assert token is not None
        assert limiter.get_holders(key).keys() == {token}
        assert waiter_members(loaded_client, key) == []

    def test_waiter_killed_blocks_next_until_its_lease_ends(
        self, limiter, loaded_client, redis_url, key
    ):
        holder = limiter.acquire(key, 1)
        killed = WaiterProcesses(redis_url, key, 1)
        wait_s = _core.WAIT_LEASE_MS / 1000 + _core.FALLBACK_POLL_S + 3
        try:
            killed.start()
            killed.gos[0].set()
            assert wait_until(lambda: len(waiter_members(loaded_client, key)) == 2)
            killed_token = next(iter(waiter_lease_ends_ms(loaded_client, key)))
            time.sleep(ARRIVAL_GAP_S)
            with ThreadPoolExecutor(1) as pool:
                second = pool.submit(
                    lambda: (limiter.acquire(key, 1, wait_s), server_ms(loaded_client))
                )
                assert wait_until(lambda: len(waiter_members(loaded_client, key)) == 4)
                os.kill(killed.processes[0].pid, signal.SIGKILL)
                killed.processes[0].join(10)
                killed_lease_end = waiter_lease_ends_ms(loaded_client, key)[killed_token]
                assert limiter.release(key, holder) is True
                token, granted_at = second.result(timeout=wait_s + 10)
        finally:
            killed.stop()

        assert token is not None
        # The dead waiter kept its place until its lease ended, and no longer.
        assert granted_at >= killed_lease_end
        assert limiter.get_holders(key).keys() == {token}
        assert waiter_members(loaded_client, key) == []
