"""How acquire cost grows with live slots, other keys and ended leases.

Server time here comes from SLOWLOG with slowlog-log-slower-than 0, which
records the duration of every call with its arguments. So a batch of
acquire+release pairs leaves the key as it found it, and the log still
separates the acquire's time from the release's.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

import redis

from concurrent_runs import ConcurrentRunsLimiter

from .contenders import LEASE_MS, LEASE_S
from .settings import Settings
from .stats import median, slowlog_durations, summarize_us

# SLOWLOG also lists the commands that a function runs inside, so one pair
# leaves 15 to 20 entries. The extra room is for a library that grows.
SLOWLOG_ENTRIES_PER_PAIR = 50
WORST_CALL_SLOWLOG_ENTRIES = 10_000
FILL_CHUNK = 1000  # members per ZADD, keys per MSET
HOUR_MS = 3_600_000
SCALE_PREFIX = "bench:scale:"
OTHER_KEYS_PREFIX = "bench:other"


def slowlog_length(settings: Settings) -> int:
    """Return a slowlog-max-len that keeps every entry of one scaling batch."""
    return max(
        settings.scale_batch * SLOWLOG_ENTRIES_PER_PAIR, WORST_CALL_SLOWLOG_ENTRIES
    )


def server_ms(client: redis.Redis) -> int:
    seconds, microseconds = client.time()
    return seconds * 1000 + microseconds // 1000


def add_members(
    client: redis.Redis, key: str, count: int, score: Callable[[int], int]
) -> None:
    """Add ``count`` random 32-hex-digit members to a sorted set, pipelined."""
    with client.pipeline(transaction=False) as pipe:
        for start in range(0, count, FILL_CHUNK):
            stop = min(start + FILL_CHUNK, count)
            mapping = {secrets.token_hex(16): score(i) for i in range(start, stop)}
            pipe.zadd(key, mapping)
        pipe.execute()


def fill_other_keys(client: redis.Redis, count: int) -> str:
    """Add ``count`` string keys; return how: DEBUG POPULATE or pipelined MSET."""
    try:
        client.execute_command("DEBUG", "POPULATE", count, OTHER_KEYS_PREFIX, 16)
        return "DEBUG POPULATE"
    except redis.ResponseError:
        pass  # DEBUG is disabled on this server (enable-debug-command)
    with client.pipeline(transaction=False) as pipe:
        for start in range(0, count, FILL_CHUNK):
            stop = min(start + FILL_CHUNK, count)
            pipe.mset(
                {f"{OTHER_KEYS_PREFIX}:{i}": "x" * 16 for i in range(start, stop)}
            )
        pipe.execute()
    return "pipelined MSET"


class ScalingPhase:
    def __init__(
        self, client: redis.Redis, settings: Settings, progress: Callable[[str], None]
    ) -> None:
        self.client = client
        self.settings = settings
        self.progress = progress
        self.limiter = ConcurrentRunsLimiter(
            client=client, key_prefix=SCALE_PREFIX, slot_timeout=LEASE_S
        )
        self.slowlog_entries = slowlog_length(settings)

    def build_levels(self) -> None:
        lease_end = server_ms(self.client) + HOUR_MS
        for live in self.settings.scale_levels:
            if live:
                self.progress(f"scaling: adding {live:,} live slots to one key")
                add_members(
                    self.client, SCALE_PREFIX + str(live), live, lambda i: lease_end
                )

    def run_batch(self, live: int) -> tuple[float, dict[str, list[int]]]:
        """Time pairs on the key with ``live`` slots; return pairs/s and durations."""
        key = str(live)
        max_slots = live + 10
        self.client.slowlog_reset()
        started = time.perf_counter()
        for _ in range(self.settings.scale_batch):
            token = self.limiter.acquire(key, max_slots)
            if token is None:
                raise RuntimeError(
                    f"acquire on the key with {live} live slots returned None"
                )
            self.limiter.release(key, token)
        elapsed = time.perf_counter() - started
        durations = slowlog_durations(self.client, self.slowlog_entries)
        return self.settings.scale_batch / elapsed, durations

    def measure(self, levels: tuple[int, ...], label: str) -> dict[str, Any]:
        """Time pairs at each level in interleaved rounds.

        The ratio to the empty key (live=0) compares the batch medians of
        acquire time round by round, so a call that was descheduled does not
        move it.
        """
        acquire: dict[int, list[int]] = {live: [] for live in levels}
        release: dict[int, list[int]] = {live: [] for live in levels}
        rates: dict[int, list[float]] = {live: [] for live in levels}
        round_medians: dict[int, list[float]] = {live: [] for live in levels}
        self.limiter.get_count("0")  # checks the library once, outside the rounds
        rounds = self.settings.scale_rounds
        for number in range(rounds):
            self.progress(f"scaling{label}: round {number + 1}/{rounds}")
            shift = number % len(levels)
            for live in levels[shift:] + levels[:shift]:
                rate, durations = self.run_batch(live)
                acquires = durations.get("runs_acquire", [])
                acquire[live].extend(acquires)
                release[live].extend(durations.get("runs_release", []))
                rates[live].append(rate)
                if acquires:
                    round_medians[live].append(median(acquires))

        rows = []
        for live in levels:
            pairs = zip(round_medians[live], round_medians[levels[0]])
            ratios = [level / empty for level, empty in pairs if empty > 0]
            rows.append(
                {
                    "live_slots": live,
                    "acquire": summarize_us(acquire[live]),
                    "release": summarize_us(release[live]),
                    "pairs_per_s": median(rates[live]),
                    "acquire_ratio_to_empty": median(ratios) if ratios else None,
                }
            )
        return {"rows": rows}

    def memory_per_slot(self) -> dict[str, Any]:
        live = max(self.settings.scale_levels)
        key = SCALE_PREFIX + str(live)
        usage = self.client.memory_usage(key, samples=0)
        encoding = self.client.object("encoding", key)
        return {
            "live_slots": live,
            "key_bytes": usage,
            "bytes_per_slot": usage / live,
            "encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
        }


def measure_scaling(
    client: redis.Redis, settings: Settings, progress: Callable[[str], None]
) -> dict[str, Any]:
    phase = ScalingPhase(client, settings, progress)
    phase.build_levels()
    levels = settings.scale_levels
    result: dict[str, Any] = {"levels": phase.measure(levels, "")}
    result["memory"] = phase.memory_per_slot()

    progress(f"scaling: adding {settings.other_keys:,} other keys")
    started = time.perf_counter()
    method = fill_other_keys(client, settings.other_keys)
    result["other_keys"] = {
        "count": settings.other_keys,
        "dbsize": client.dbsize(),
        "fill_method": method,
        "fill_s": time.perf_counter() - started,
    }
    with_other = (levels[0], levels[-1])
    result["with_other_keys"] = phase.measure(with_other, " with other keys")
    return result


# Worst single call -----------------------------------------------------------


# The order of calls on a key full of ended leases. runs_acquire goes first,
# so it is the call that meets every ended lease at once.
def worst_call_plan(live_token: str) -> list[tuple[str, tuple[Any, ...]]]:
    new_token = secrets.token_hex(16)
    waiter_token = secrets.token_hex(16)
    return [
        ("runs_acquire", (10, LEASE_MS, new_token)),
        ("runs_count", ()),
        ("runs_holders", ()),
        ("runs_extend", (live_token, LEASE_MS)),
        ("runs_wait", (10, LEASE_MS, waiter_token, 3000)),
        ("runs_release", (new_token,)),
        ("runs_release", (waiter_token,)),
        ("runs_reap", ()),
    ]


READ_ONLY = frozenset({"runs_count", "runs_holders"})


def measure_worst_call(
    client: redis.Redis, settings: Settings, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Time each function once on a key holding many ended leases and one live slot.

    Each repeat builds a fresh key. A call's time is the median over repeats,
    because SLOWLOG measures wall time, and on a shared machine the server can
    be descheduled in the middle of any call; the maximum is kept too.
    """
    count = settings.ended_leases
    durations: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    for repeat in range(settings.worst_repeats):
        progress(
            f"worst call: {count:,} ended leases, "
            f"repeat {repeat + 1}/{settings.worst_repeats}"
        )
        key = f"bench:ended:{repeat}"
        now = server_ms(client)
        add_members(client, key, count, lambda i: now - 60_000 - i % 1000)
        live_token = secrets.token_hex(16)
        client.zadd(key, {live_token: now + HOUR_MS})

        client.slowlog_reset()
        for function, args in worst_call_plan(live_token):
            command = client.fcall_ro if function in READ_ONLY else client.fcall
            try:
                command(function, 1, key, *args)
            except redis.ResponseError as exc:
                errors[function] = str(exc)
        logged = slowlog_durations(client, WORST_CALL_SLOWLOG_ENTRIES)
        for function, values in logged.items():
            # runs_release runs twice per repeat; its slower call counts.
            durations.setdefault(function, []).append(max(values))
        client.unlink(key)
    by_function = {
        function: {"median_us": median(values), "max_us": max(values), "us": values}
        for function, values in durations.items()
    }
    return {
        "ended_leases": count,
        "repeats": settings.worst_repeats,
        "by_function": by_function,
        "errors": errors,
    }
