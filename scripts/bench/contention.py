"""Processes competing for the slots of one key, with and without ``wait``.

Each worker process loops until the run ends: acquire a slot, hold it for a
short sleep, release it. Without ``wait`` a refused worker pauses briefly and
tries again; with ``wait`` it waits in line. A counter shared by the workers
goes up after acquire returns a token and down before release is sent, so it
never exceeds the slots that Redis holds for them: its peak must stay within
the limit.

Redis calls per granted slot come from INFO commandstats over the run:
commands that the library's Lua functions run inside an FCALL are counted
apart, so "client calls" are the requests the workers sent. Each worker
also counts its FCALLs by function name.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
import time
from collections import Counter
from typing import Any, Callable

import redis

from concurrent_runs import ConcurrentRunsLimiter
from concurrent_runs.library import library_source

from .settings import Settings
from .stats import read_commandstats

KEY_PREFIX = "bench:contention:"
OWN_COMMANDS = frozenset({"config|resetstat", "info"})
START_TIMEOUT_S = 60.0


def commands_inside_library() -> frozenset[str]:
    """Return the commands the Lua library runs through redis.call or pcall."""
    names = re.findall(r"call\(\s*'([A-Za-z]+)'", library_source())
    return frozenset(name.lower() for name in names)


class FunctionCountingRedis(redis.Redis):
    """A client that counts its FCALL and FCALL_RO calls by function name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.function_calls: Counter[str] = Counter()

    def fcall(self, function: str, numkeys: int, *keys_and_args: Any) -> Any:
        self.function_calls[function] += 1
        return super().fcall(function, numkeys, *keys_and_args)

    def fcall_ro(self, function: str, numkeys: int, *keys_and_args: Any) -> Any:
        self.function_calls[function] += 1
        return super().fcall_ro(function, numkeys, *keys_and_args)


def worker(
    url: str,
    key: str,
    max_slots: int,
    use_wait: bool,
    settings: Settings,
    ready: Any,
    start: Any,
    holders: Any,
    peak: Any,
    lock: Any,
    results: Any,
) -> None:
    """Acquire, hold and release slots of ``key`` until the run ends."""
    grants = refusals = 0
    try:
        client = FunctionCountingRedis.from_url(url)
        limiter = ConcurrentRunsLimiter(
            client=client, slot_timeout=30, key_prefix=KEY_PREFIX
        )
        limiter.get_count(key)  # connects and checks the library before the run
        ready.wait(START_TIMEOUT_S)
        start.wait(START_TIMEOUT_S)
        client.function_calls.clear()
        deadline = time.monotonic() + settings.contention_s
        while (remaining := deadline - time.monotonic()) > 0:
            wait = max(remaining, 0.01) if use_wait else None
            token = limiter.acquire(key, max_slots, wait=wait)
            if token is None:
                refusals += 1
                if not use_wait:
                    time.sleep(settings.retry_pause_s)
                continue
            with lock:
                holders.value += 1
                peak.value = max(peak.value, holders.value)
            time.sleep(settings.hold_s)
            with lock:
                holders.value -= 1
            limiter.release(key, token)
            grants += 1
        limiter.close()
    except Exception as exc:  # reported by the parent, which fails the phase
        ready.abort()  # so that no process waits for this worker at the barrier
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        return
    results.put(
        {
            "grants": grants,
            "refusals": refusals,
            "functions": dict(client.function_calls),
        }
    )


def run_mode(
    url: str, client: redis.Redis, settings: Settings, use_wait: bool
) -> dict[str, Any]:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    count = settings.contention_processes
    max_slots = settings.contention_slots
    key = "with-wait" if use_wait else "no-wait"
    ready = context.Barrier(count + 1)
    start = context.Event()
    lock = context.Lock()
    holders = context.Value("i", 0, lock=False)
    peak = context.Value("i", 0, lock=False)
    results = context.Queue()
    processes = [
        context.Process(
            target=worker,
            args=(
                url,
                key,
                max_slots,
                use_wait,
                settings,
                ready,
                start,
                holders,
                peak,
                lock,
                results,
            ),
            daemon=True,
        )
        for _ in range(count)
    ]
    for process in processes:
        process.start()
    try:
        try:
            ready.wait(START_TIMEOUT_S)
        except threading.BrokenBarrierError:
            failure = results.get(timeout=START_TIMEOUT_S)
            raise RuntimeError(
                f"a contention worker failed: {failure['error']}"
            ) from None
        client.config_resetstat()
        started = time.perf_counter()
        start.set()
        outcomes = [
            results.get(timeout=settings.contention_s + START_TIMEOUT_S)
            for _ in processes
        ]
        elapsed = time.perf_counter() - started
        stats = read_commandstats(client)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()

    errors = [outcome["error"] for outcome in outcomes if "error" in outcome]
    if errors:
        raise RuntimeError(f"a contention worker failed: {errors[0]}")
    grants = sum(outcome["grants"] for outcome in outcomes)
    functions: Counter[str] = Counter()
    for outcome in outcomes:
        functions.update(outcome["functions"])
    refusals = sum(outcome["refusals"] for outcome in outcomes)
    inside = commands_inside_library()
    client_calls = {
        name: row["calls"]
        for name, row in stats.items()
        if name not in inside and name not in OWN_COMMANDS
    }
    inner_calls = {name: row["calls"] for name, row in stats.items() if name in inside}
    total_client = sum(client_calls.values())
    per_grant = (lambda n: n / grants) if grants else (lambda n: None)
    return {
        "wait": use_wait,
        "processes": count,
        "max_slots": max_slots,
        "seconds": elapsed,
        "grants": grants,
        "refusals": refusals,
        "pairs_per_s": grants / elapsed,
        "client_calls": total_client,
        "client_calls_per_grant": per_grant(total_client),
        "client_calls_by_command_per_grant": {
            name: per_grant(calls)
            for name, calls in sorted(client_calls.items(), key=lambda item: -item[1])
        },
        "function_calls_per_grant": {
            name: per_grant(calls) for name, calls in functions.most_common()
        },
        "calls_inside_functions_per_grant": per_grant(sum(inner_calls.values())),
        "peak_holders": peak.value,
    }


def measure_contention(
    url: str, client: redis.Redis, settings: Settings, progress: Callable[[str], None]
) -> dict[str, Any]:
    modes = {}
    for use_wait in (False, True):
        label = "with wait" if use_wait else "without wait"
        progress(
            f"contention: {settings.contention_processes} processes, "
            f"{settings.contention_slots} slots, {label}, {settings.contention_s:g} s"
        )
        modes["with_wait" if use_wait else "without_wait"] = run_mode(
            url, client, settings, use_wait
        )
    return {
        "hold_s": settings.hold_s,
        "retry_pause_s": settings.retry_pause_s,
        "modes": modes,
    }
