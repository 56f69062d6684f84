"""Record what each process held, on Redis server time, and check the record.

A worker process runs acquire, extend and release calls through the wrapper
and reads Redis TIME around each call. From those readings it derives, for
every slot, two bounds in microseconds of server time:

- ``live_until``: the lease was surely live before this instant. The server
  ran the call no earlier than the TIME read just before it, so the lease ends
  no earlier than that reading (in whole ms) plus the lease length.
- ``dead_from``: the lease had surely ended at this instant. The server ran
  the call no later than the TIME read just after its reply.

A hold is the span in which the caller knew it held the slot: from the TIME
read right after the acquire reply to the TIME read right before the release
call, cut at ``live_until``. The checker replays every hold and proves that no
key ever had more holds at one instant than its limit, and that each release
and extend returned what the lease bounds allow.
"""

from __future__ import annotations

import random
import time
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

US_PER_MS = 1000


@dataclass(frozen=True)
class Hold:
    """One slot as its holder knew it, in microseconds of server time."""

    key: str
    token: str
    worker: int
    start_us: int
    end_us: int

    def describe(self) -> str:
        return (
            f"token {self.token} of worker {self.worker} held "
            f"[{self.start_us}, {self.end_us}) us"
        )


@dataclass(frozen=True)
class Call:
    """A release or extend of a held slot, with the lease bounds known before it."""

    name: str
    key: str
    token: str
    worker: int
    sent_after_us: int
    replied_before_us: int
    live_until_us: int
    dead_from_us: int
    returned: bool

    def describe(self) -> str:
        return (
            f"{self.name} of token {self.token} (worker {self.worker}) on {self.key!r} "
            f"ran within [{self.sent_after_us}, {self.replied_before_us}] us and "
            f"returned {self.returned}; the lease was surely live before "
            f"{self.live_until_us} us and surely ended from {self.dead_from_us} us"
        )


@dataclass
class History:
    """Everything the workers recorded."""

    holds: list[Hold]
    calls: list[Call]
    refused: dict[str, int]
    granted: dict[str, int]
    call_count: int


def lease_bound_us(server_us: int, lease_ms: int) -> int:
    """Return the lease end of a call that the server ran at ``server_us``.

    The library reads TIME in whole milliseconds, and a lease that ends at ms
    E is live while server time in ms is below E.
    """
    return (server_us // US_PER_MS + lease_ms) * US_PER_MS


# Checking ----------------------------------------------------------------------


def find_excess_holders(holds: Iterable[Hold], limits: Mapping[str, int]) -> str | None:
    """Return a report of the first instant a key had more holds than its limit.

    Holds are half-open intervals, so a hold that ends at the instant another
    starts does not overlap it. Return None when no key ever exceeded its limit.
    """
    by_key: dict[str, list[Hold]] = {}
    for hold in holds:
        if hold.end_us > hold.start_us:
            by_key.setdefault(hold.key, []).append(hold)

    for key, key_holds in sorted(by_key.items()):
        limit = limits[key]
        # At one instant, ends (0) sort before starts (1).
        events = [(hold.start_us, 1, index) for index, hold in enumerate(key_holds)]
        events += [(hold.end_us, 0, index) for index, hold in enumerate(key_holds)]
        events.sort()
        live: set[int] = set()
        for instant, is_start, index in events:
            if not is_start:
                live.discard(index)
                continue
            live.add(index)
            if len(live) > limit:
                holders = sorted((key_holds[i] for i in live), key=lambda h: h.start_us)
                lines = "\n".join("  " + hold.describe() for hold in holders)
                overlap_end = min(hold.end_us for hold in holders)
                return (
                    f"key {key!r} had {len(live)} live holders (limit {limit}) during "
                    f"[{instant}, {overlap_end}) us of server time:\n{lines}"
                )
    return None


def find_wrong_replies(calls: Iterable[Call]) -> list[str]:
    """Return a report of each release or extend whose reply the lease bounds rule out.

    A call that surely ran while the lease was live must return True, and a
    call that surely ran after the lease ended must return False.
    """
    wrong = []
    for call in calls:
        surely_live = call.replied_before_us < call.live_until_us
        surely_ended = call.sent_after_us >= call.dead_from_us
        if surely_live and not call.returned:
            wrong.append("a live lease was refused: " + call.describe())
        if surely_ended and call.returned:
            wrong.append("an ended lease was accepted: " + call.describe())
    return wrong


# Recording (runs in each worker process) ------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker process does; picklable for multiprocessing spawn."""

    redis_url: str
    worker: int
    seed: int
    limits: Mapping[str, int]
    lease_ms_choices: tuple[int, ...]
    iterations: int


def run_worker(plan: WorkerPlan, start_barrier: Any, results: Any) -> None:
    """Run ``plan`` after every worker has started; put its record on ``results``."""
    try:
        start_barrier.wait(timeout=120)
        results.put(("ok", record_history(plan)))
    except BaseException:
        results.put(("error", f"worker {plan.worker}:\n{traceback.format_exc()}"))


def record_history(plan: WorkerPlan) -> History:
    """Run the calls of ``plan`` against its server and record each with TIME."""
    import redis

    from concurrent_runs import ConcurrentRunsLimiter

    rng = random.Random(plan.seed)
    client = redis.Redis.from_url(plan.redis_url, socket_timeout=10)
    limiters = {
        lease_ms: ConcurrentRunsLimiter(client=client, slot_timeout=lease_ms / 1000)
        for lease_ms in plan.lease_ms_choices
    }
    history = History(holds=[], calls=[], refused={}, granted={}, call_count=0)

    def server_us() -> int:
        seconds, microseconds = client.time()
        return seconds * 1_000_000 + microseconds

    keys = sorted(plan.limits)
    for _ in range(plan.iterations):
        key = rng.choice(keys)
        lease_ms = rng.choice(plan.lease_ms_choices)
        limiter = limiters[lease_ms]
        wait = rng.choice([None, None, 0.1])

        before = server_us()
        token = limiter.acquire(key, plan.limits[key], wait=wait)
        start = server_us()
        history.call_count += 1
        if token is None:
            history.refused[key] = history.refused.get(key, 0) + 1
            continue
        history.granted[key] = history.granted.get(key, 0) + 1
        live_until = lease_bound_us(before, lease_ms)
        dead_from = lease_bound_us(start, lease_ms)

        outlive = rng.random() < 0.15
        if outlive:
            # Outlive the lease: the extend and release below must find it ended.
            time.sleep(lease_ms / 1000 + 0.02)
        else:
            time.sleep(rng.uniform(0, lease_ms / 2000))
        if outlive or rng.random() < 0.5:
            extend_ms = rng.choice(plan.lease_ms_choices)
            sent = server_us()
            extended = limiter.extend(key, token, extend_ms / 1000)
            replied = server_us()
            history.call_count += 1
            history.calls.append(
                Call("extend", key, token, plan.worker, sent, replied,
                     live_until, dead_from, extended)
            )
            if extended:
                # The extend replaced the lease end, possibly with an earlier one.
                live_until = lease_bound_us(sent, extend_ms)
                dead_from = lease_bound_us(replied, extend_ms)
        time.sleep(rng.uniform(0, 0.02))

        sent = server_us()
        released = limiter.release(key, token)
        replied = server_us()
        history.call_count += 1
        history.calls.append(
            Call("release", key, token, plan.worker, sent, replied,
                 live_until, dead_from, released)
        )
        history.holds.append(
            Hold(key, token, plan.worker, start, min(sent, live_until))
        )
    client.close()
    return history


def merge(histories: Iterable[History]) -> History:
    """Combine the histories of all workers into one."""
    merged = History(holds=[], calls=[], refused={}, granted={}, call_count=0)
    for history in histories:
        merged.holds += history.holds
        merged.calls += history.calls
        merged.call_count += history.call_count
        for key, count in history.refused.items():
            merged.refused[key] = merged.refused.get(key, 0) + count
        for key, count in history.granted.items():
            merged.granted[key] = merged.granted.get(key, 0) + count
    return merged
