"""Real processes racing for few slots, and a holder killed while it holds one.

Each process builds its own limiter from the server's URL, the way separate
services sharing a Redis would. Times come from Redis (TIME), the only clock
the limiter uses, so the checks do not depend on the processes' clocks.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import time

import redis

from concurrent_runs import ConcurrentRunsLimiter

PREFIX = "concurrent_runs:"
PROCESSES = 6
MAX_SLOTS = 2
CYCLES_PER_PROCESS = 150
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 120


def server_time_us(client: redis.Redis) -> int:
    seconds, microseconds = client.time()
    return seconds * 1_000_000 + microseconds


def race_for_slots(redis_url: str, key: str, start, results) -> None:
    """Hold a slot of `key` CYCLES_PER_PROCESS times; send back the intervals held.

    An interval runs from the server time read right after acquiring to the
    server time read right before releasing, so it lies inside the time the
    slot was really held.
    """
    intervals = []
    rejected = 0
    with ConcurrentRunsLimiter(redis_url, slot_timeout=30) as limiter:
        clock = redis.Redis.from_url(redis_url)
        limiter.get_count(key)  # check the library before the race starts
        start.wait(START_TIMEOUT_S)
        while len(intervals) < CYCLES_PER_PROCESS:
            token = limiter.acquire(key, MAX_SLOTS)
            if token is None:
                rejected += 1
                time.sleep(random.uniform(0, 0.001))
                continue
            began = server_time_us(clock)
            time.sleep(random.uniform(0, 0.002))
            ended = server_time_us(clock)
            released = limiter.release(key, token)
            intervals.append((began, ended, released))
        clock.close()
    results.put((os.getpid(), intervals, rejected))


def receive(results, processes, timeout_s: float):
    """Return the next item a child process sends, failing fast if one of them failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return results.get(timeout=0.2)
        except queue.Empty:
            pass
        failed = [process.exitcode for process in processes if process.exitcode not in (None, 0)]
        assert not failed, f"a child process failed with exit code {failed}"
        assert time.monotonic() < deadline, f"no child process reported within {timeout_s} s"


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    """Return the largest number of intervals that share an instant."""
    events = []
    for began, ended in intervals:
        events.append((began, 1))
        events.append((ended, -1))
    # At equal times an end sorts before a start, so touching intervals do not overlap.
    events.sort(key=lambda event: (event[0], event[1]))
    held = 0
    peak = 0
    for _, change in events:
        held += change
        peak = max(peak, held)
    return peak


def test_racing_processes_never_exceed_max_slots(redis_url, loaded_client, key):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    workers = [
        context.Process(target=race_for_slots, args=(redis_url, key, start, results))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [receive(results, workers, RUN_TIMEOUT_S) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join()

    assert all(worker.exitcode == 0 for worker in workers)
    intervals = [(began, ended) for _, held, _ in reports for began, ended, _ in held]
    assert len(intervals) == PROCESSES * CYCLES_PER_PROCESS
    assert all(released for _, held, _ in reports for _, _, released in held)
    assert max_overlap(intervals) <= MAX_SLOTS
    assert sum(rejected for _, _, rejected in reports) > 0
    assert loaded_client.fcall_ro("runs_count", 1, PREFIX + key) == 0


def test_max_overlap_counts_shared_instants():
    assert max_overlap([(0, 10), (5, 15), (8, 9)]) == 3
    assert max_overlap([(0, 10), (10, 20)]) == 1
    assert max_overlap([]) == 0


def hold_slot_until_killed(redis_url: str, key: str, slot_timeout: float, tokens) -> None:
    with ConcurrentRunsLimiter(redis_url, slot_timeout=slot_timeout) as limiter:
        tokens.put(limiter.acquire(key, 1))
        while True:
            time.sleep(60)


def sample_count(client: redis.Redis, redis_key: str) -> tuple[int, int]:
    """Return the live slot count and the server time in ms, read in one transaction."""
    pipe = client.pipeline(transaction=True)
    pipe.fcall_ro("runs_count", 1, redis_key)
    pipe.time()
    live, (seconds, microseconds) = pipe.execute()
    return live, seconds * 1000 + microseconds // 1000


def test_killed_holder_slot_frees_when_lease_ends(redis_url, loaded_client, key):
    slot_timeout = 1.0
    redis_key = PREFIX + key
    context = multiprocessing.get_context("spawn")
    tokens = context.Queue()
    holder = context.Process(
        target=hold_slot_until_killed, args=(redis_url, key, slot_timeout, tokens)
    )
    holder.start()
    try:
        token = receive(tokens, [holder], START_TIMEOUT_S)
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=10)
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()
    assert holder.exitcode == -signal.SIGKILL
    assert token is not None
    lease_end_ms = int(loaded_client.zscore(redis_key, token))

    # Sample the count until the lease has ended. Samples within 2 ms of the
    # end are skipped: the count and TIME are two commands a moment apart.
    before_end, after_end = [], []
    while True:
        live, now_ms = sample_count(loaded_client, redis_key)
        if now_ms < lease_end_ms - 2:
            before_end.append(live)
        elif now_ms > lease_end_ms + 2:
            after_end.append(live)
            break
        time.sleep(0.05)

    assert set(before_end) <= {1}
    assert after_end == [0]
    with ConcurrentRunsLimiter(redis_url, slot_timeout=30) as limiter:
        assert limiter.get_count(key) == 0
        successor = limiter.acquire(key, 1)
    assert successor is not None
    assert successor != token


def test_killed_holder_slot_counts_until_lease_ends(redis_url, loaded_client, key):
    slot_timeout = 30.0
    context = multiprocessing.get_context("spawn")
    tokens = context.Queue()
    holder = context.Process(
        target=hold_slot_until_killed, args=(redis_url, key, slot_timeout, tokens)
    )
    holder.start()
    try:
        token = receive(tokens, [holder], START_TIMEOUT_S)
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=10)
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()

    with ConcurrentRunsLimiter(redis_url, slot_timeout=30) as limiter:
        assert limiter.get_count(key) == 1
        assert list(limiter.get_holders(key)) == [token]
        assert limiter.acquire(key, 1) is None
