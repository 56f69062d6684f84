"""Summaries of samples, and what the server reports about its own work.

Server time comes from two places. INFO commandstats keeps, per command, the
number of calls and the microseconds spent in them since the last CONFIG
RESETSTAT. Commands that a Lua function runs through redis.call are counted
too, under their own names, and their time is also inside the FCALL's time.
SLOWLOG, with slowlog-log-slower-than 0, keeps the duration of every single
call with its arguments, so it separates one function from another. It lists
the commands run inside a function as entries of their own.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import redis
import redis.asyncio.connection
import redis.connection


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def summarize_us(samples: Sequence[float]) -> dict[str, float]:
    """Return count, mean, p50, p90, p99 and max of samples given in microseconds."""
    ordered = sorted(samples)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "mean_us": sum(ordered) / len(ordered),
        "p50_us": percentile(ordered, 0.50),
        "p90_us": percentile(ordered, 0.90),
        "p99_us": percentile(ordered, 0.99),
        "max_us": ordered[-1],
    }


# Server statistics -----------------------------------------------------------


def read_commandstats(client: redis.Redis) -> dict[str, dict[str, int]]:
    """Return {command: {"calls": n, "usec": total}} from INFO commandstats.

    Subcommands keep Redis's own names, such as ``config|resetstat``.
    """
    stats: dict[str, dict[str, int]] = {}
    for name, fields in client.info("commandstats").items():
        command = name.removeprefix("cmdstat_")
        stats[command] = {"calls": int(fields["calls"]), "usec": int(fields["usec"])}
    return stats


def enable_full_slowlog(client: redis.Redis, max_len: int) -> dict[str, str]:
    """Log every command in SLOWLOG; return the settings to restore afterwards."""
    saved = {
        name: str(client.config_get(name)[name])
        for name in ("slowlog-log-slower-than", "slowlog-max-len")
    }
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", max_len)
    client.slowlog_reset()
    return saved


def restore_config(client: redis.Redis, saved: dict[str, str]) -> None:
    for name, value in saved.items():
        client.config_set(name, value)


def slowlog_durations(client: redis.Redis, max_entries: int) -> dict[str, list[int]]:
    """Return the logged durations (µs) of FCALLs, by function name, then reset.

    Only FCALL and FCALL_RO entries are kept; the function name is the
    entry's second word.
    """
    durations: dict[str, list[int]] = {}
    for entry in client.slowlog_get(max_entries):
        words = entry["command"].split(b" ", 2)
        if len(words) < 2 or words[0].upper() not in (b"FCALL", b"FCALL_RO"):
            continue
        durations.setdefault(words[1].decode(), []).append(int(entry["duration"]))
    client.slowlog_reset()
    return durations


# Round trips -------------------------------------------------------------------


class RoundTripCounter:
    """How many times clients wrote a request to Redis; a pipeline counts once."""

    def __init__(self) -> None:
        self.sent = 0


ROUND_TRIPS = RoundTripCounter()


class CountingConnection(redis.connection.Connection):
    """A sync connection that counts each request it writes."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        ROUND_TRIPS.sent += 1
        super().send_packed_command(command, check_health)


class AsyncCountingConnection(redis.asyncio.connection.Connection):
    """An asyncio connection that counts each request it writes."""

    async def send_packed_command(
        self, command: Any, check_health: bool = True
    ) -> None:
        ROUND_TRIPS.sent += 1
        await super().send_packed_command(command, check_health)


def counting_client(url: str) -> redis.Redis:
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    return redis.Redis(connection_pool=pool)


def async_counting_client(url: str) -> redis.asyncio.Redis:
    pool = redis.asyncio.ConnectionPool.from_url(
        url, connection_class=AsyncCountingConnection
    )
    return redis.asyncio.Redis(connection_pool=pool)
