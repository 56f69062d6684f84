"""Server time per call of runs_acquire and runs_release, against a yardstick.

The yardstick is the least a sorted-set acquire with leases must do, written
as a bare Redis function: read the clock, count the live slots with ZCOUNT,
add the token with ZADD. It removes no ended slots and sets no TTL; a second
variant adds the PEXPIRE that the contract of runs_acquire requires. A
function that runs no command shows the fixed cost of an FCALL, and
runs_acquire with an empty TOKEN, which its argument checks reject, shows the
cost of those checks.

Each round runs a batch of every function, CONFIG RESETSTAT before each batch,
and reads INFO commandstats after it, so each reading covers one function
alone. Every acquire takes a slot of a key that does not exist yet, as an
acquire+release pair meets it: releasing the last slot deletes the key.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

import redis

from .contenders import LEASE_MS
from .settings import Settings
from .stats import median, read_commandstats

YARDSTICK_LIBRARY = "concurrent_runs_bench"
YARDSTICK_SOURCE = """#!lua name=concurrent_runs_bench
-- Yardsticks for the benchmark: the least that a sorted-set acquire does.

local function now_ms()
    local time = redis.call('TIME')
    return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- KEYS[1] limit key; ARGV MAX_SLOTS, TIMEOUT_MS, TOKEN. Returns 1 or 0.
local function bench_yard_acquire(keys, args)
    local key = keys[1]
    local now = now_ms()
    local live = redis.call('ZCOUNT', key, '(' .. string.format('%d', now), '+inf')
    if live >= tonumber(args[1]) then
        return 0
    end
    redis.call('ZADD', key, string.format('%d', now + tonumber(args[2])), args[3])
    return 1
end

-- As bench_yard_acquire, and the key expires with its newest lease.
local function bench_yard_acquire_ttl(keys, args)
    local granted = bench_yard_acquire(keys, args)
    if granted == 1 then
        redis.call('PEXPIRE', keys[1], args[2])
    end
    return granted
end

-- KEYS[1] limit key; ARGV TOKEN. Returns 1 when TOKEN was removed.
local function bench_yard_release(keys, args)
    return redis.call('ZREM', keys[1], args[1])
end

-- Takes the arguments of an acquire and runs no command: the fixed cost of FCALL.
local function bench_noop(keys, args)
    return 1
end

-- As bench_noop, but replies with an error: the fixed cost of a rejected FCALL.
local function bench_noop_error(keys, args)
    return redis.error_reply('ERR invalid argument')
end

redis.register_function('bench_yard_acquire', bench_yard_acquire)
redis.register_function('bench_yard_acquire_ttl', bench_yard_acquire_ttl)
redis.register_function('bench_yard_release', bench_yard_release)
redis.register_function('bench_noop', bench_noop)
redis.register_function('bench_noop_error', bench_noop_error)
"""

# (group, acquire function, release function or None)
GROUPS: tuple[tuple[str, str, str | None], ...] = (
    ("runs", "runs_acquire", "runs_release"),
    ("yardstick", "bench_yard_acquire", "bench_yard_release"),
    ("yardstick_ttl", "bench_yard_acquire_ttl", "bench_yard_release"),
    ("noop", "bench_noop", None),
)
# Commands in a reading that the benchmark itself sent.
OWN_COMMANDS = frozenset({"config|resetstat", "info"})


def load_yardstick(client: redis.Redis) -> None:
    client.function_load(YARDSTICK_SOURCE, replace=True)


def delete_yardstick(client: redis.Redis) -> None:
    try:
        client.function_delete(YARDSTICK_LIBRARY)
    except redis.ResponseError:
        pass  # not loaded: nothing to delete


class Tally:
    """Per-round server time of one call, and the commands it ran inside.

    ``command`` is the command the client sent (FCALL, or SET and EVALSHA
    for redis-py's Lock); every other command in a reading ran inside it.
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self.round_usec_per_call: list[float] = []
        self.calls = 0
        self.usec = 0
        self.inner: dict[str, dict[str, int]] = {}

    def add(self, stats: dict[str, dict[str, int]]) -> None:
        sent = stats.get(self.command, {"calls": 0, "usec": 0})
        if sent["calls"]:
            self.round_usec_per_call.append(sent["usec"] / sent["calls"])
        self.calls += sent["calls"]
        self.usec += sent["usec"]
        for name, row in stats.items():
            if name == self.command or name in OWN_COMMANDS:
                continue
            total = self.inner.setdefault(name, {"calls": 0, "usec": 0})
            total["calls"] += row["calls"]
            total["usec"] += row["usec"]

    def summary(self) -> dict[str, Any]:
        if not self.calls:
            return {"calls": 0}
        inner = {
            name: {
                "calls_per_call": row["calls"] / self.calls,
                "usec_per_call": row["usec"] / self.calls,
            }
            for name, row in sorted(
                self.inner.items(), key=lambda item: -item[1]["usec"]
            )
        }
        inner_usec = sum(row["usec_per_call"] for row in inner.values())
        pooled = self.usec / self.calls
        return {
            "command": self.command,
            "calls": self.calls,
            "usec_per_call": median(self.round_usec_per_call),
            "pooled_usec_per_call": pooled,
            "round_usec_per_call": self.round_usec_per_call,
            "redis_calls_per_call": sum(
                row["calls_per_call"] for row in inner.values()
            ),
            "inner_commands": inner,
            "inner_usec_per_call": inner_usec,
            "outside_commands_usec_per_call": pooled - inner_usec,
        }


def fcall_batch(
    client: redis.Redis, function: str, calls: list[tuple[Any, ...]]
) -> dict[str, dict[str, int]]:
    """Call ``function`` once per argument tuple; return the batch's commandstats."""
    client.config_resetstat()
    for args in calls:
        reply = client.fcall(function, 1, *args)
        if reply != 1:
            raise RuntimeError(f"{function}{args!r} returned {reply!r}, expected 1")
    return read_commandstats(client)


class ServerTimePhase:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.tallies: dict[str, Tally] = {}
        self.ratios: dict[str, list[float]] = {"yardstick": [], "yardstick_ttl": []}

    def tally(self, group: str, name: str, command: str) -> Tally:
        return self.tallies.setdefault(f"{group}:{name}", Tally(command))

    def run_function_group(
        self, number: int, group: str, acquire: str, release: str | None
    ) -> float:
        """Time acquires on new keys, then their releases; return µs per acquire."""
        batch = self.settings.server_batch
        keys = [f"bench:server:{group}:{number}:{i}" for i in range(batch)]
        tokens = [secrets.token_hex(16) for _ in keys]
        acquire_calls = [(key, 3, LEASE_MS, token) for key, token in zip(keys, tokens)]
        stats = fcall_batch(self.client, acquire, acquire_calls)
        self.tally(group, acquire, "fcall").add(stats)
        if release is not None:
            self.tally(group, release, "fcall").add(
                fcall_batch(self.client, release, list(zip(keys, tokens)))
            )
        return stats["fcall"]["usec"] / stats["fcall"]["calls"]

    def run_redis_lock(self, number: int) -> None:
        """Time redis-py Lock's acquire (SET NX PX) and release (EVALSHA) alike."""
        names = [
            f"bench:server:lock:{number}:{i}" for i in range(self.settings.server_batch)
        ]
        locks = [self.client.lock(name, timeout=LEASE_MS / 1000) for name in names]
        self.client.config_resetstat()
        for lock in locks:
            if not lock.acquire(blocking=False):
                raise RuntimeError("redis-py Lock.acquire returned False on a new key")
        self.tally("redis_lock", "acquire", "set").add(read_commandstats(self.client))
        self.client.config_resetstat()
        for lock in locks:
            lock.release()
        self.tally("redis_lock", "release", "evalsha").add(
            read_commandstats(self.client)
        )

    def run_rejected(self, group: str, function: str) -> None:
        """Time calls that reply with an error; return nothing, tally the time.

        runs_acquire gets an empty TOKEN, which its argument checks reject
        before any Redis command runs, so its time is FCALL's own, the checks
        and the error reply. bench_noop_error shows FCALL and the error reply
        alone.
        """
        self.client.config_resetstat()
        rejected = 0
        for _ in range(self.settings.server_batch):
            try:
                self.client.fcall(function, 1, "bench:server:rejected", 3, 1, "")
            except redis.ResponseError:
                rejected += 1
        if rejected != self.settings.server_batch:
            raise RuntimeError(f"{function} accepted an empty TOKEN")
        self.tally(group, function, "fcall").add(read_commandstats(self.client))

    def run_round(self, number: int) -> None:
        steps = [
            *GROUPS,
            ("redis_lock", "", None),
            ("rejected", "runs_acquire", None),
            ("noop_error", "bench_noop_error", None),
        ]
        shift = number % len(steps)
        acquire_usec: dict[str, float] = {}
        for group, acquire, release in steps[shift:] + steps[:shift]:
            if group == "redis_lock":
                self.run_redis_lock(number)
            elif group in ("rejected", "noop_error"):
                self.run_rejected(group, acquire)
            else:
                acquire_usec[group] = self.run_function_group(
                    number, group, acquire, release
                )
        for group, values in self.ratios.items():
            if acquire_usec[group] > 0:
                values.append(acquire_usec["runs"] / acquire_usec[group])

    def warm_up(self) -> None:
        """Load redis-py Lock's release script, so no round pays SCRIPT LOAD."""
        lock = self.client.lock("bench:server:warm-up", timeout=10)
        lock.acquire(blocking=False)
        lock.release()

    def summary(self) -> dict[str, Any]:
        calls = {}
        for name, tally in self.tallies.items():
            group, function = name.split(":", 1)
            calls[name] = {"group": group, "function": function, **tally.summary()}
        return {
            "calls": calls,
            "acquire_ratio_to_yardstick": {
                group: {
                    "median": median(values),
                    "min": min(values),
                    "max": max(values),
                }
                for group, values in self.ratios.items()
                if values
            },
        }


def measure_server_time(
    client: redis.Redis, settings: Settings, progress: Callable[[str], None]
) -> dict[str, Any]:
    phase = ServerTimePhase(client, settings)
    phase.warm_up()
    for number in range(settings.server_rounds):
        progress(f"server time: round {number + 1}/{settings.server_rounds}")
        phase.run_round(number)
    return phase.summary()
