"""The asyncio limiter: the waiting and renewal tests of the sync limiter, again.

TestWait, TestFairness and TestRenewal carry the names of their sync twins in
test_waiting.py and test_renewal.py (a test below checks that). TestCancellation
covers what only asyncio has: a task cancelled at any point, even while it
waits for a connection of a bounded pool, gives back its slot or place in
line before the cancellation reaches the caller.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import os
import signal
import time
import weakref
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import redis
import redis.asyncio

import concurrent_runs.aio
from concurrent_runs import (
    AsyncConcurrentRunsLimiter,
    AsyncSlot,
    ConcurrentRunsError,
    ConcurrentRunsLimiter,
    Slot,
    SlotLimitReachedError,
    _core,
    acquire_slot,
    async_acquire_slot,
    get_async_concurrent_limiter,
    get_concurrent_limiter,
)
from servers import RedisServer
from test_renewal import (
    OUTAGE_SLOT_TIMEOUT_S,
    OUTAGE_SOCKET_TIMEOUT_S,
    REQUEST_SLACK_S,
    SHORT_SLOT_TIMEOUT_S,
    LostRecorder,
    limiter_records,
    renewal_retries,
)
from test_waiting import (
    ARRIVAL_GAP_S,
    WAITER_COUNT,
    WaiterProcesses,
    command_count,
    fcall_count,
    redis_key,
    waiter_lease_ends_ms,
    waiter_members,
)

TESTS_FOLDER = Path(__file__).parent
# Moments to cancel at: after this many turns of the event loop, and after
# these many seconds, counted from the start of the task.
CANCEL_AFTER_TURNS = range(0, 24)
CANCEL_AFTER_S = (0.0001, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.008, 0.012)
LONG_SLOT_TIMEOUT_S = 60  # a slot that leaked would show for a minute


async def eventually(predicate: Callable[[], Any], timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` every few ms without blocking the loop."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.005)
    return bool(predicate())


async def turns(count: int) -> None:
    """Let the other tasks run ``count`` steps each."""
    for _ in range(count):
        await asyncio.sleep(0)


def cancel_points() -> list[Callable[[], Awaitable[None]]]:
    """Return waits that each end at another moment after a task starts."""
    points: list[Callable[[], Awaitable[None]]] = []
    points += [lambda count=count: turns(count) for count in CANCEL_AFTER_TURNS]
    points += [lambda seconds=seconds: asyncio.sleep(seconds) for seconds in CANCEL_AFTER_S]
    return points


async def cancel_and_wait(task: asyncio.Task, timeout_s: float = 10.0) -> None:
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    assert task in done, "the task went on after it was cancelled"


def live_slots(client: redis.Redis, key: str) -> dict[bytes, int]:
    """Return the live slots of a logical key, read with a blocking client.

    The event loop makes no progress during the read, so clean-up left running
    in the background after a task ended cannot finish before it.
    """
    flat = client.fcall_ro("runs_holders", 1, redis_key(key))
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


async def async_server_ms(client: Any) -> int:
    seconds, microseconds = await client.time()
    return seconds * 1000 + microseconds // 1000


class ReleaseRecordingAsyncLimiter(AsyncConcurrentRunsLimiter):
    """An asyncio limiter that keeps what each release returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release_results: list[bool] = []

    async def release(self, key, token):
        freed = await super().release(key, token)
        self.release_results.append(freed)
        return freed


def async_wait_in_line_process(
    url: str,
    key: str,
    index: int,
    ready: Any,
    go: Any,
    grants: Any,
) -> None:
    """wait_in_line_process on the asyncio limiter, in a spawned process."""

    async def wait_then_hold() -> None:
        limiter = AsyncConcurrentRunsLimiter(url, slot_timeout=30)
        await limiter.get_count(key)
        ready.set()
        go.wait()
        token = await limiter.acquire(key, 1, wait=30)
        grants.put((index, await async_server_ms(limiter.client) if token else None))
        if token is not None:
            await asyncio.sleep(0.02)
            await limiter.release(key, token)
        await limiter.close()

    asyncio.run(wait_then_hold())


@pytest.fixture
async def process_limiter_env(redis_url, loaded_client, monkeypatch):
    """Point the process-wide asyncio limiter at the test server, built afresh."""
    monkeypatch.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)
    monkeypatch.setattr(concurrent_runs.aio, "_shared_limiters", weakref.WeakKeyDictionary())
    yield monkeypatch
    shared = concurrent_runs.aio._shared_limiters.get(asyncio.get_running_loop())
    if shared is not None:
        await shared.close()


# Twins ---------------------------------------------------------------------


def public_names(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def parameters(function: Callable[..., Any]) -> list[tuple]:
    """Return what a caller sees of each parameter: name, kind and default."""
    return [
        (p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()
    ]


def collect_test_names(path: Path) -> dict[str, set[str]]:
    """Return the names of the test methods of each Test class in a file."""
    tree = ast.parse(path.read_text())
    return {
        node.name: {
            item.name
            for item in node.body
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            and item.name.startswith("test_")
        }
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test")
    }


class TestTwins:
    def test_limiter_signatures_match(self):
        sync_names = public_names(ConcurrentRunsLimiter)
        async_names = public_names(AsyncConcurrentRunsLimiter)

        assert sync_names == async_names
        assert parameters(ConcurrentRunsLimiter.__init__) == parameters(
            AsyncConcurrentRunsLimiter.__init__
        )
        for name in sorted(sync_names):
            sync_member = getattr(ConcurrentRunsLimiter, name)
            async_member = getattr(AsyncConcurrentRunsLimiter, name)
            if isinstance(sync_member, property):
                assert isinstance(async_member, property), name
                continue
            assert parameters(sync_member) == parameters(async_member), name
            # slot() and limit() build a context manager or a decorator; every
            # other method talks to Redis, so its twin is a coroutine function.
            talks_to_redis = name not in {"slot", "limit"}
            assert inspect.iscoroutinefunction(async_member) is talks_to_redis, name

    def test_slot_attributes_match(self, limiter, async_limiter, key):
        sync_slot = limiter.slot(key, 2, wait=1.5, renew=True)
        async_slot = async_limiter.slot(key, 2, wait=1.5, renew=True)

        assert parameters(Slot.__init__) == parameters(AsyncSlot.__init__)
        sync_attributes = {n for n in vars(sync_slot) if not n.startswith("_")}
        async_attributes = {n for n in vars(async_slot) if not n.startswith("_")}
        assert sync_attributes == async_attributes
        assert {"token", "lost"} <= sync_attributes
        for name in sorted(sync_attributes):
            assert getattr(sync_slot, name) == getattr(async_slot, name), name
        assert public_names(Slot) == public_names(AsyncSlot)

    def test_module_functions_match(self):
        assert parameters(acquire_slot) == parameters(async_acquire_slot)
        assert parameters(get_concurrent_limiter) == parameters(get_async_concurrent_limiter)
        assert inspect.signature(async_acquire_slot).return_annotation == "AsyncSlot"

    def test_async_test_names_mirror_sync(self):
        sync_tests = collect_test_names(TESTS_FOLDER / "test_waiting.py")
        sync_tests.update(collect_test_names(TESTS_FOLDER / "test_renewal.py"))
        async_tests = collect_test_names(Path(__file__))

        for class_name, names in sync_tests.items():
            assert class_name in async_tests
            assert names - async_tests[class_name] == set(), class_name


# Waiting -------------------------------------------------------------------


class TestWait:
    async def test_wait_slot_released_wakes_waiter(
        self, async_limiter, loaded_client, key, monkeypatch
    ):
        # With the fallback poll stretched to 30 s, only the release's message
        # can wake the waiter within the 10 s the test allows.
        monkeypatch.setattr(_core, "FALLBACK_POLL_S", 30.0)
        holder = await async_limiter.acquire(key, 1)

        waiting = asyncio.create_task(async_limiter.acquire(key, 1, 30))
        assert await eventually(lambda: waiter_members(loaded_client, key))
        assert await async_limiter.release(key, holder) is True
        token = await asyncio.wait_for(waiting, 10)

        assert token is not None
        assert (await async_limiter.get_holders(key)).keys() == {token}
        assert waiter_members(loaded_client, key) == []

    async def test_wait_time_up_returns_none(self, async_limiter, loaded_client, key):
        holder = await async_limiter.acquire(key, 1)

        token = await async_limiter.acquire(key, 1, wait=0.3)

        assert token is None
        assert (await async_limiter.get_holders(key)).keys() == {holder}
        assert waiter_members(loaded_client, key) == []

    async def test_slot_wait_time_up_raises_slot_limit_reached(
        self, async_limiter, loaded_client, key
    ):
        await async_limiter.acquire(key, 1)

        with pytest.raises(SlotLimitReachedError) as caught:
            async with async_limiter.slot(key, 1, wait=0.3):
                pytest.fail("the block ran without a slot")

        assert caught.value.key == key
        assert caught.value.max_slots == 1
        assert caught.value.wait == 0.3
        assert waiter_members(loaded_client, key) == []
        assert await async_limiter.get_count(key) == 1

    async def test_slot_wait_slot_released_enters_block(
        self, async_limiter, loaded_client, key
    ):
        holder = await async_limiter.acquire(key, 1)

        async def release_soon() -> bool:
            await asyncio.sleep(0.2)
            return await async_limiter.release(key, holder)

        releasing = asyncio.create_task(release_soon())
        async with async_limiter.slot(key, 1, wait=10) as token:
            assert (await async_limiter.get_holders(key)).keys() == {token}

        assert await releasing is True
        assert await async_limiter.get_count(key) == 0
        assert waiter_members(loaded_client, key) == []

    async def test_acquire_slot_wait_time_up_raises(
        self, process_limiter_env, loaded_client, key
    ):
        holder = await get_async_concurrent_limiter().acquire(key, 1)

        with pytest.raises(SlotLimitReachedError) as caught:
            async with async_acquire_slot(key, 1, wait=0.3):
                pytest.fail("the block ran without a slot")

        assert caught.value.wait == 0.3
        assert (await get_async_concurrent_limiter().get_holders(key)).keys() == {holder}
        assert waiter_members(loaded_client, key) == []

    async def test_wait_zero_tries_once(self, async_limiter, loaded_client, key):
        await async_limiter.acquire(key, 1)

        assert await async_limiter.acquire(key, 1, wait=0) is None
        assert waiter_members(loaded_client, key) == []

    async def test_acquire_with_waiter_in_line_returns_none(
        self, async_limiter, loaded_client, key
    ):
        holder = await async_limiter.acquire(key, 1)

        waiting = asyncio.create_task(async_limiter.acquire(key, 1, 10))
        assert await eventually(lambda: waiter_members(loaded_client, key))
        assert await async_limiter.release(key, holder) is True
        jumped = await async_limiter.acquire(key, 1)
        token = await asyncio.wait_for(waiting, 10)

        assert jumped is None
        assert token is not None
        assert (await async_limiter.get_holders(key)).keys() == {token}

    async def test_wait_full_key_calls_redis_rarely(self, server_folder, key):
        with RedisServer(server_folder) as server, server.client() as admin:
            limiter = AsyncConcurrentRunsLimiter(server.url, slot_timeout=30)
            await limiter.acquire(key, 1)
            fcalls_before = fcall_count(admin)
            subscribes_before = command_count(admin, "ssubscribe")

            token = await limiter.acquire(key, 1, wait=2)

            fcalls = fcall_count(admin) - fcalls_before
            subscribes = command_count(admin, "ssubscribe") - subscribes_before
            await limiter.close()

        assert token is None
        assert 2 <= fcalls <= 10
        assert subscribes == 1


class TestFairness:
    async def test_waiters_get_slots_in_arrival_order(self, async_limiter, loaded_client, key):
        holder = await async_limiter.acquire(key, 1)
        grant_order: list[int] = []

        async def wait_then_hold(index: int) -> None:
            token = await async_limiter.acquire(key, 1, wait=30)
            assert token is not None
            grant_order.append(index)
            await asyncio.sleep(0.02)
            await async_limiter.release(key, token)

        waiters = []
        for index in range(WAITER_COUNT):
            waiters.append(asyncio.create_task(wait_then_hold(index)))
            entries = 2 * (index + 1)
            assert await eventually(lambda: len(waiter_members(loaded_client, key)) == entries)
            await asyncio.sleep(ARRIVAL_GAP_S)
        assert await async_limiter.release(key, holder) is True
        await asyncio.wait_for(asyncio.gather(*waiters), 30)

        assert grant_order == list(range(WAITER_COUNT))
        assert await async_limiter.get_count(key) == 0
        assert waiter_members(loaded_client, key) == []

    async def test_waiters_in_processes_get_slots_in_arrival_order(
        self, async_limiter, loaded_client, redis_url, key
    ):
        holder = await async_limiter.acquire(key, 1)
        waiters = WaiterProcesses(redis_url, key, WAITER_COUNT, async_wait_in_line_process)
        try:
            waiters.start()
            for index in range(WAITER_COUNT):
                waiters.gos[index].set()
                entries = 2 * (index + 1)
                assert await eventually(
                    lambda: len(waiter_members(loaded_client, key)) == entries
                )
                await asyncio.sleep(ARRIVAL_GAP_S)
            assert await async_limiter.release(key, holder) is True
            grants = []
            for _ in range(WAITER_COUNT):
                grants.append(await asyncio.to_thread(waiters.grants.get, timeout=30))
            exit_codes = await asyncio.to_thread(waiters.join)
        finally:
            waiters.stop()

        granted_at = {index: at for index, at in grants}
        assert exit_codes == [0] * WAITER_COUNT
        assert None not in granted_at.values()
        assert sorted(granted_at, key=granted_at.__getitem__) == list(range(WAITER_COUNT))
        assert await async_limiter.get_count(key) == 0
        assert waiter_members(loaded_client, key) == []

    async def test_waiter_timed_out_leaves_line_to_next(
        self, async_limiter, loaded_client, key
    ):
        holder = await async_limiter.acquire(key, 1)

        first = asyncio.create_task(async_limiter.acquire(key, 1, 0.5))
        assert await eventually(lambda: len(waiter_members(loaded_client, key)) == 2)
        await asyncio.sleep(ARRIVAL_GAP_S)
        second = asyncio.create_task(async_limiter.acquire(key, 1, 30))
        assert await asyncio.wait_for(first, 10) is None
        assert len(waiter_members(loaded_client, key)) == 2
        assert await async_limiter.release(key, holder) is True
        token = await asyncio.wait_for(second, 10)

        assert token is not None
        assert (await async_limiter.get_holders(key)).keys() == {token}
        assert waiter_members(loaded_client, key) == []

    async def test_waiter_cancelled_leaves_line_to_next(
        self, async_limiter, loaded_client, key, monkeypatch
    ):
        # Only the cancelled waiter's own release may wake the next one in
        # time: the fallback poll is stretched past the 10 s allowed.
        monkeypatch.setattr(_core, "FALLBACK_POLL_S", 30.0)
        holder = await async_limiter.acquire(key, 1)

        first = asyncio.create_task(async_limiter.acquire(key, 1, 30))
        assert await eventually(lambda: len(waiter_members(loaded_client, key)) == 2)
        await asyncio.sleep(ARRIVAL_GAP_S)
        second = asyncio.create_task(async_limiter.acquire(key, 1, 30))
        assert await eventually(lambda: len(waiter_members(loaded_client, key)) == 4)
        assert await async_limiter.release(key, holder) is True
        await cancel_and_wait(first)
        token = await asyncio.wait_for(second, 10)

        assert first.cancelled()
        assert token is not None
        assert (await async_limiter.get_holders(key)).keys() == {token}
        assert waiter_members(loaded_client, key) == []

    async def test_waiter_killed_blocks_next_until_its_lease_ends(
        self, async_limiter, loaded_client, redis_url, key
    ):
        holder = await async_limiter.acquire(key, 1)
        killed = WaiterProcesses(redis_url, key, 1, async_wait_in_line_process)
        wait_s = _core.WAIT_LEASE_MS / 1000 + _core.FALLBACK_POLL_S + 3

        async def wait_then_note_time() -> tuple[str | None, int]:
            token = await async_limiter.acquire(key, 1, wait_s)
            return token, await async_server_ms(async_limiter.client)

        try:
            killed.start()
            killed.gos[0].set()
            assert await eventually(lambda: len(waiter_members(loaded_client, key)) == 2)
            killed_token = next(iter(waiter_lease_ends_ms(loaded_client, key)))
            await asyncio.sleep(ARRIVAL_GAP_S)
            second = asyncio.create_task(wait_then_note_time())
            assert await eventually(lambda: len(waiter_members(loaded_client, key)) == 4)
            os.kill(killed.processes[0].pid, signal.SIGKILL)
            killed.processes[0].join(10)
            killed_lease_end = waiter_lease_ends_ms(loaded_client, key)[killed_token]
            assert await async_limiter.release(key, holder) is True
            token, granted_at = await asyncio.wait_for(second, wait_s + 10)
        finally:
            killed.stop()

        assert token is not None
        assert granted_at >= killed_lease_end
        assert (await async_limiter.get_holders(key)).keys() == {token}
        assert waiter_members(loaded_client, key) == []


# Renewal -------------------------------------------------------------------


class TestRenewal:
    async def test_renew_keeps_slot_past_slot_timeout(self, redis_url, loaded_client, key):
        limiter = ReleaseRecordingAsyncLimiter(redis_url, slot_timeout=SHORT_SLOT_TIMEOUT_S)

        async with limiter.slot(key, 1, renew=True) as token:
            for _ in range(8):
                await asyncio.sleep(0.25)
                assert await limiter.get_count(key) == 1
            assert (await limiter.get_holders(key)).keys() == {token}

        assert limiter.release_results == [True]
        assert await limiter.get_count(key) == 0
        await limiter.close()

    async def test_acquire_slot_renew_keeps_slot(
        self, process_limiter_env, key
    ):
        process_limiter_env.setenv("CONCURRENT_RUNS_SLOT_TIMEOUT", str(SHORT_SLOT_TIMEOUT_S))

        async with async_acquire_slot(key, 1, renew=True) as token:
            await asyncio.sleep(SHORT_SLOT_TIMEOUT_S * 2.5)
            holders = await get_async_concurrent_limiter().get_holders(key)

        assert get_async_concurrent_limiter().slot_timeout == SHORT_SLOT_TIMEOUT_S
        assert holders.keys() == {token}
        assert await get_async_concurrent_limiter().get_count(key) == 0

    async def test_no_renew_slot_ends_after_slot_timeout(self, redis_url, loaded_client, key):
        limiter = ReleaseRecordingAsyncLimiter(redis_url, slot_timeout=SHORT_SLOT_TIMEOUT_S)

        async with limiter.slot(key, 1) as token:
            await asyncio.sleep(SHORT_SLOT_TIMEOUT_S + 0.1)
            assert token not in await limiter.get_holders(key)
        await limiter.close()

        assert limiter.release_results == [False]

    async def test_renewal_stops_on_exit(self, server_folder, key, caplog):
        with RedisServer(server_folder) as server, server.client() as admin:
            limiter = AsyncConcurrentRunsLimiter(server.url, slot_timeout=SHORT_SLOT_TIMEOUT_S)
            slot = limiter.slot(key, 1, renew=True)
            async with slot:
                await asyncio.sleep(SHORT_SLOT_TIMEOUT_S)
            calls_after_exit = fcall_count(admin)
            await asyncio.sleep(SHORT_SLOT_TIMEOUT_S)
            calls_later = fcall_count(admin)
            await limiter.close()

        assert calls_later == calls_after_exit
        assert slot.lost is False
        assert limiter_records(caplog, logging.ERROR) == []

    @pytest.mark.parametrize("removal", ["release", "zrem"])
    async def test_renewal_lease_gone_marks_lost(
        self, redis_url, loaded_client, key, caplog, removal
    ):
        limiter = AsyncConcurrentRunsLimiter(redis_url, slot_timeout=SHORT_SLOT_TIMEOUT_S)
        calls: list[tuple[Any, str]] = []
        called = asyncio.Event()

        async def on_lost(lost_key: Any, lost_token: str) -> None:
            await asyncio.sleep(0)
            calls.append((lost_key, lost_token))
            called.set()

        slot = limiter.slot(key, 1, renew=True, on_lost=on_lost)
        async with slot as token:
            if removal == "release":
                assert await limiter.release(key, token) is True
            else:
                assert loaded_client.zrem(redis_key(key), token) == 1
            await asyncio.wait_for(called.wait(), 5)
            assert slot.lost is True

        assert calls == [(key, token)]
        errors = limiter_records(caplog, logging.ERROR)
        assert len(errors) == 1
        assert token in errors[0].getMessage()
        assert await limiter.get_count(key) == 0
        await limiter.close()

    async def test_renewal_on_lost_raising_is_logged(
        self, redis_url, loaded_client, key, caplog
    ):
        limiter = AsyncConcurrentRunsLimiter(redis_url, slot_timeout=SHORT_SLOT_TIMEOUT_S)
        called = asyncio.Event()

        async def on_lost(lost_key: Any, lost_token: str) -> None:
            called.set()
            raise RuntimeError("on_lost failed")

        slot = limiter.slot(key, 1, renew=True, on_lost=on_lost)
        async with slot as token:
            await limiter.release(key, token)
            await asyncio.wait_for(called.wait(), 5)
            assert await eventually(lambda: len(limiter_records(caplog, logging.ERROR)) == 2)
        await limiter.close()

        assert slot.lost is True
        errors = limiter_records(caplog, logging.ERROR)
        assert errors[1].exc_info is not None
        assert "on_lost failed" in str(errors[1].exc_info[1])

    async def test_renewal_server_paused_briefly_keeps_slot(self, server_folder, key, caplog):
        with RedisServer(server_folder) as server:
            limiter = ReleaseRecordingAsyncLimiter(
                server.url,
                slot_timeout=OUTAGE_SLOT_TIMEOUT_S,
                socket_timeout=OUTAGE_SOCKET_TIMEOUT_S,
            )
            on_lost = LostRecorder()
            slot = limiter.slot(key, 1, renew=True, on_lost=on_lost)
            async with slot as token:
                server.signal(signal.SIGSTOP)
                try:
                    assert await eventually(lambda: renewal_retries(caplog), timeout_s=5)
                finally:
                    server.signal(signal.SIGCONT)
                await asyncio.sleep(OUTAGE_SLOT_TIMEOUT_S * _core.RENEW_FRACTION + 0.2)
                assert slot.lost is False
                assert (await limiter.get_holders(key)).keys() == {token}
            await limiter.close()

        assert on_lost.calls == []
        assert limiter.release_results == [True]
        assert limiter_records(caplog, logging.ERROR) == []

    @pytest.mark.parametrize("outage", ["paused", "stopped"])
    async def test_renewal_server_unreachable_past_lease_marks_lost(
        self, server_folder, key, caplog, outage
    ):
        with RedisServer(server_folder) as server:
            limiter = AsyncConcurrentRunsLimiter(
                server.url,
                slot_timeout=OUTAGE_SLOT_TIMEOUT_S,
                socket_timeout=OUTAGE_SOCKET_TIMEOUT_S,
            )
            on_lost = LostRecorder()
            slot = limiter.slot(key, 1, renew=True, on_lost=on_lost)
            async with slot as token:
                read_at = time.monotonic()
                seconds_left = (await limiter.get_holders(key))[token]
                if outage == "paused":
                    server.signal(signal.SIGSTOP)
                else:
                    server.stop()
                try:
                    assert await eventually(
                        lambda: on_lost.calls, timeout_s=OUTAGE_SLOT_TIMEOUT_S + 5
                    )
                finally:
                    if outage == "paused":
                        server.signal(signal.SIGCONT)
                assert slot.lost is True
                if outage == "paused":
                    assert await limiter.get_count(key) == 0
            await limiter.close()

        assert on_lost.calls == [(key, token)]
        assert on_lost.at >= read_at + seconds_left - REQUEST_SLACK_S
        retries = renewal_retries(caplog)
        errors = limiter_records(caplog, logging.ERROR)
        assert len(retries) >= 1
        assert len(errors) == 1
        assert max(r.created for r in retries) <= errors[0].created


# Cancellation --------------------------------------------------------------


class TestCancellation:
    async def test_cancel_free_key_leaks_no_slot(
        self, redis_url, loaded_client, key
    ):
        limiter = AsyncConcurrentRunsLimiter(redis_url, slot_timeout=LONG_SLOT_TIMEOUT_S)
        entered_block = 0

        for number, cancel_point in enumerate(cancel_points()):
            entered = asyncio.Event()

            async def hold() -> None:
                async with limiter.slot(key, 2):
                    entered.set()
                    await asyncio.sleep(60)

            task = asyncio.create_task(hold())
            await cancel_point()
            await cancel_and_wait(task)

            assert task.cancelled(), number
            assert live_slots(loaded_client, key) == {}, number
            entered_block += entered.is_set()
        await limiter.close()

        # Cancels landed both before and inside the block.
        assert 0 < entered_block < len(cancel_points())

    async def test_cancel_full_key_leaks_no_place(
        self, redis_url, loaded_client, key
    ):
        limiter = AsyncConcurrentRunsLimiter(redis_url, slot_timeout=LONG_SLOT_TIMEOUT_S)
        holder = await limiter.acquire(key, 1)

        for number, cancel_point in enumerate(cancel_points()):

            async def hold() -> None:
                async with limiter.slot(key, 1, wait=30):
                    pytest.fail("the block ran while the key was full")

            task = asyncio.create_task(hold())
            await cancel_point()
            await cancel_and_wait(task)

            assert task.cancelled(), number
            assert live_slots(loaded_client, key).keys() == {holder.encode()}, number
            assert waiter_members(loaded_client, key) == [], number
        await limiter.close()

    async def test_cancel_as_slot_comes_free_leaks_no_slot(
        self, redis_url, loaded_client, key
    ):
        limiter = AsyncConcurrentRunsLimiter(redis_url, slot_timeout=LONG_SLOT_TIMEOUT_S)

        for number, cancel_point in enumerate(cancel_points()):
            holder = await limiter.acquire(key, 1)

            async def hold() -> None:
                async with limiter.slot(key, 1, wait=30):
                    await asyncio.sleep(60)

            task = asyncio.create_task(hold())
            assert await eventually(lambda: waiter_members(loaded_client, key)), number
            releasing = asyncio.create_task(limiter.release(key, holder))
            await cancel_point()
            await cancel_and_wait(task)

            assert await releasing is True, number
            assert task.cancelled(), number
            assert live_slots(loaded_client, key) == {}, number
            assert waiter_members(loaded_client, key) == [], number
        await limiter.close()

    async def test_cancel_inside_block_releases_and_stops_renewal(
        self, server_folder, key, caplog
    ):
        with RedisServer(server_folder) as server, server.client() as admin:
            limiter = AsyncConcurrentRunsLimiter(server.url, slot_timeout=SHORT_SLOT_TIMEOUT_S)
            slot = limiter.slot(key, 1, renew=True)
            entered = asyncio.Event()

            async def hold() -> None:
                async with slot:
                    entered.set()
                    await asyncio.sleep(60)

            task = asyncio.create_task(hold())
            await asyncio.wait_for(entered.wait(), 10)
            await asyncio.sleep(SHORT_SLOT_TIMEOUT_S)
            await cancel_and_wait(task)
            count_at_once = len(live_slots(admin, key))
            calls_after_exit = fcall_count(admin)
            await asyncio.sleep(SHORT_SLOT_TIMEOUT_S)
            calls_later = fcall_count(admin)
            await limiter.close()

        assert task.cancelled()
        assert count_at_once == 0
        assert calls_later == calls_after_exit
        assert slot.lost is False
        assert limiter_records(caplog, logging.ERROR) == []

    async def test_timeout_around_waiting_slot_leaves_line(
        self, async_limiter, loaded_client, key
    ):
        holder = await async_limiter.acquire(key, 1)

        async def hold() -> None:
            async with async_limiter.slot(key, 1, wait=30):
                pytest.fail("the block ran while the key was full")

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(hold(), 0.3)

        assert live_slots(loaded_client, key).keys() == {holder.encode()}
        assert waiter_members(loaded_client, key) == []

    @pytest.mark.parametrize("wait", [None, 30])
    async def test_cancel_repeatedly_leaks_no_slot(self, redis_url, loaded_client, key, wait):
        # Some frameworks cancel a task again on every turn of the loop until
        # it ends; the clean-up must still finish before the task does.
        limiter = AsyncConcurrentRunsLimiter(redis_url, slot_timeout=LONG_SLOT_TIMEOUT_S)
        holder = await limiter.acquire(key, 1) if wait else None

        for number, cancel_point in enumerate(cancel_points()):

            async def hold() -> None:
                async with limiter.slot(key, 1, wait=wait):
                    await asyncio.sleep(60)

            task = asyncio.create_task(hold())
            await cancel_point()
            for _ in range(1000):
                if task.done():
                    break
                task.cancel()
                await asyncio.sleep(0)
            # Read at once: the loop turns of an await here could let
            # clean-up left running in the background finish first.
            slots_at_end = live_slots(loaded_client, key)
            waiters_at_end = waiter_members(loaded_client, key)

            assert task.done(), number
            assert task.cancelled(), number
            expected = {holder.encode()} if holder else set()
            assert slots_at_end.keys() == expected, number
            assert waiters_at_end == [], number
        await limiter.close()

    @pytest.mark.parametrize("tasks_count", [2, 20])
    async def test_cancel_waiting_for_pool_connection_is_not_swallowed(
        self, redis_url, loaded_client, key, tasks_count
    ):
        # redis.asyncio can finish a call normally although its task was
        # cancelled meanwhile (asyncio.wait_for on Python < 3.12 returns a
        # result that is ready, and drops the cancel); a pool of one
        # connection makes many tasks wait inside redis.asyncio.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            redis_url, max_connections=1, timeout=10, socket_timeout=5
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        limiter = AsyncConcurrentRunsLimiter(client=client, slot_timeout=LONG_SLOT_TIMEOUT_S)
        await limiter.get_count(key)

        for number, cancel_point in enumerate(cancel_points()):

            async def hold() -> None:
                async with limiter.slot(key, 100):
                    await asyncio.sleep(60)

            tasks = [asyncio.create_task(hold()) for _ in range(tasks_count)]
            await cancel_point()
            for task in tasks:
                task.cancel()
            done, pending = await asyncio.wait(tasks, timeout=10)

            assert pending == set(), f"{len(pending)} tasks went on after cancel ({number})"
            assert all(task.cancelled() for task in tasks), number
            assert live_slots(loaded_client, key) == {}, number
        await limiter.close()
        await pool.aclose()


# Slot objects and event loops ------------------------------------------------


class TestSlotObject:
    async def test_slot_object_reentered_while_held_raises(self, async_limiter, key):
        guard = async_limiter.slot(key, 3)

        async with guard:
            with pytest.raises(ConcurrentRunsError, match="already held"):
                async with guard:
                    pass
            assert await async_limiter.get_count(key) == 1

        assert await async_limiter.get_count(key) == 0

    async def test_slot_object_reused_after_exit_takes_new_slot(self, async_limiter, key):
        guard = async_limiter.slot(key, 1)

        async with guard as first:
            assert await async_limiter.get_count(key) == 1
        async with guard as second:
            assert await async_limiter.get_count(key) == 1

        assert first != second
        assert guard.token is None
        assert await async_limiter.get_count(key) == 0


def test_limiter_on_second_loop_raises(redis_url, loaded_client, key):
    limiter = AsyncConcurrentRunsLimiter(redis_url, slot_timeout=60)

    async def hold_once():
        async with limiter.slot(key, 1):
            pass

    async def hold_once_then_close():
        await hold_once()
        await limiter.close()

    asyncio.run(hold_once_then_close())
    with pytest.raises(ConcurrentRunsError, match="another event loop"):
        asyncio.run(hold_once())

    assert loaded_client.fcall_ro("runs_count", 1, f"concurrent_runs:{key}") == 0


def test_process_limiter_serves_each_event_loop(redis_url, loaded_client, key, monkeypatch):
    monkeypatch.setenv("CONCURRENT_RUNS_REDIS_URL", redis_url)
    monkeypatch.setattr(concurrent_runs.aio, "_shared_limiters", weakref.WeakKeyDictionary())
    monkeypatch.setattr(concurrent_runs.aio, "_unbound_limiter", None)

    async def hold_once():
        async with async_acquire_slot(key, 1) as token:
            count = await get_async_concurrent_limiter().get_count(key)
        await get_async_concurrent_limiter().close()
        return token, count

    first_token, first_count = asyncio.run(hold_once())
    second_token, second_count = asyncio.run(hold_once())

    assert first_count == 1
    assert second_count == 1
    assert first_token != second_token
    assert loaded_client.fcall_ro("runs_count", 1, f"concurrent_runs:{key}") == 0
