"""Acquire+release pairs of every contender, in interleaved rounds.

Each round runs one batch of every contender, in an order that rotates from
round to round, so load from other processes and drift of the machine fall on
all contenders alike. A contender's rate in a round is divided by the floor's
rate (two PINGs, same I/O mode) in that same round, and the reported ratio is
the median over rounds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import redis
import redis.asyncio

from .contenders import CONTENDERS, Contender, NotInstalledError
from .stats import (
    ROUND_TRIPS,
    async_counting_client,
    counting_client,
    median,
    summarize_us,
)
from .settings import Settings

Runner = Callable[[int], "tuple[int, list[float]]"]


def sync_runner(pair: Callable[[], None]) -> Runner:
    def run(count: int) -> tuple[int, list[float]]:
        samples: list[float] = []
        clock = time.perf_counter_ns
        started = clock()
        for _ in range(count):
            before = clock()
            pair()
            samples.append((clock() - before) / 1000)
        return clock() - started, samples

    return run


def async_runner(pair: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> Runner:
    async def batch(count: int) -> tuple[int, list[float]]:
        samples: list[float] = []
        clock = time.perf_counter_ns
        started = clock()
        for _ in range(count):
            before = clock()
            await pair()
            samples.append((clock() - before) / 1000)
        return clock() - started, samples

    def run(count: int) -> tuple[int, list[float]]:
        return loop.run_until_complete(batch(count))

    return run


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PairsPhase:
    """Builds the contenders, counts their round trips and times them in rounds."""

    def __init__(self, url: str, settings: Settings, progress: Callable[[str], None]):
        self.url = url
        self.settings = settings
        self.progress = progress
        self.loop = asyncio.new_event_loop()
        self.client = redis.Redis.from_url(url)
        self.async_client = redis.asyncio.Redis.from_url(url)
        self.results: dict[str, dict[str, Any]] = {}
        self.samples: dict[str, list[float]] = {}
        self.runners: dict[str, Runner] = {}

    def runner_for(self, contender: Contender, client: Any) -> Runner:
        pair = contender.build(client)
        if contender.mode == "sync":
            return sync_runner(pair)
        return async_runner(pair, self.loop)

    def prepare(self) -> None:
        """Build and warm every contender; mark those that cannot run."""
        for contender in CONTENDERS:
            result: dict[str, Any] = {
                "name": contender.name,
                "label": contender.label,
                "mode": contender.mode,
                "package": contender.package,
                "status": "ok",
            }
            self.results[contender.key] = result
            client = self.client if contender.mode == "sync" else self.async_client
            try:
                runner = self.runner_for(contender, client)
                runner(self.settings.warmup_pairs)
            except NotInstalledError as exc:
                result.update(status="not installed", reason=str(exc))
                continue
            except Exception as exc:  # a broken contender must not stop the run
                result.update(status="failed", reason=describe_error(exc))
                continue
            self.runners[contender.key] = runner
            self.samples[contender.key] = []
            result["round_pairs_per_s"] = []

    def count_round_trips(self) -> None:
        """Count the requests each pair writes, on a connection that counts them."""
        sync_client = counting_client(self.url)
        async_client = async_counting_client(self.url)
        try:
            for contender in CONTENDERS:
                if contender.key not in self.runners:
                    continue
                client = sync_client if contender.mode == "sync" else async_client
                runner = self.runner_for(contender, client)
                runner(self.settings.round_trip_pairs)
                ROUND_TRIPS.sent = 0
                runner(self.settings.round_trip_pairs)
                per_pair = ROUND_TRIPS.sent / self.settings.round_trip_pairs
                self.results[contender.key]["round_trips_per_pair"] = per_pair
        finally:
            sync_client.close()
            self.loop.run_until_complete(async_client.aclose())

    def run_rounds(self) -> None:
        keys = list(self.runners)
        rounds = self.settings.pair_rounds
        for number in range(rounds):
            self.progress(f"pairs: round {number + 1}/{rounds}")
            shift = number % len(keys)
            for key in keys[shift:] + keys[:shift]:
                if key not in self.runners:
                    continue
                result = self.results[key]
                try:
                    wall_ns, samples = self.runners[key](self.settings.pair_batch)
                except Exception as exc:
                    result.update(status="failed", reason=describe_error(exc))
                    del self.runners[key]
                    continue
                self.samples[key].extend(samples)
                result["round_pairs_per_s"].append(len(samples) / (wall_ns / 1e9))

    def summarize(self) -> None:
        floors = {c.mode: c.key for c in CONTENDERS if c.is_floor}
        locks = {c.mode: c.key for c in CONTENDERS if c.name == "redis_lock"}
        for key, result in self.results.items():
            if result["status"] != "ok":
                result.pop("round_pairs_per_s", None)
                continue
            rates = result["round_pairs_per_s"]
            result["latency"] = summarize_us(self.samples[key])
            result["pairs_per_s"] = median(rates)
            result["ratio_to_floor"] = self.ratio_summary(rates, floors[result["mode"]])
            result["ratio_to_redis_lock"] = self.ratio_summary(
                rates, locks[result["mode"]]
            )

    def ratio_summary(
        self, rates: list[float], other_key: str
    ) -> dict[str, float] | None:
        """Return the median, min and max over rounds of rate / other's rate."""
        other = self.results.get(other_key, {})
        if other.get("status") != "ok":
            return None
        ratios = [
            mine / theirs for mine, theirs in zip(rates, other["round_pairs_per_s"])
        ]
        if not ratios:
            return None
        return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}

    def close(self) -> None:
        self.client.close()
        self.loop.run_until_complete(self.async_client.aclose())
        self.loop.close()


def measure_pairs(
    url: str, settings: Settings, progress: Callable[[str], None]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Return the result of every contender, and its pair latencies in µs."""
    phase = PairsPhase(url, settings, progress)
    try:
        progress("pairs: building and warming the contenders")
        phase.prepare()
        progress("pairs: counting round trips per pair")
        phase.count_round_trips()
        phase.run_rounds()
        phase.summarize()
    finally:
        phase.close()
    return phase.results, phase.samples
