#!/usr/bin/env python3
"""Measure what a slot of concurrent-runs costs, next to a floor and other limiters.

Every figure is a ratio to something measured in the same run: contenders run
in interleaved rounds, so machine drift falls on all of them alike. The run
starts a throwaway redis-server on 127.0.0.1, shows progress on stderr, and
writes report.md, results.json and PNG plots into the output folder.

With --redis-url (or REDIS_URL) it uses that server instead. Point it only at
a throwaway server, because the benchmark changes its configuration, loads
functions into it and flushes it.

    python scripts/benchmark.py            # full run, a few minutes
    python scripts/benchmark.py --quick    # seconds; tiny counts
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import redis
import redis.utils

from concurrent_runs.library import library_source

from bench.contention import measure_contention
from bench.pairs import measure_pairs
from bench.report import write_report
from bench.scaling import measure_scaling, measure_worst_call, slowlog_length
from bench.server import ThrowawayRedis
from bench.servertime import delete_yardstick, load_yardstick, measure_server_time
from bench.settings import FULL, QUICK, Settings
from bench.stats import enable_full_slowlog, restore_config

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
MIN_REDIS_MAJOR = 7
OPTIONAL_PACKAGES = (
    "hiredis",
    "python-redis-lock",
    "redis-rate-limiters",
    "matplotlib",
)


class Progress:
    """Prints one line per step to stderr, with the seconds since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:7.1f} s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark concurrent-runs against a floor and other Redis limiters."
        )
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="run tiny counts in seconds (for tests); the figures mean little",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for report.md, results.json and plots (default {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="a throwaway Redis 7 server to use instead of starting one "
        "(default: REDIS_URL); its data is flushed",
    )
    parser.add_argument(
        "--allow-flush",
        action="store_true",
        help="run even when the server given by --redis-url contains keys",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def redis_server(url: str | None, progress: Progress) -> Iterator[tuple[str, bool]]:
    """Yield the URL to benchmark and whether the benchmark started that server."""
    if url:
        yield url, False
        return
    with ThrowawayRedis() as server:
        progress(f"started a throwaway redis-server on {server.url}")
        yield server.url, True


def check_server(client: redis.Redis, allow_flush: bool) -> dict[str, Any]:
    info = client.info("server")
    version = str(info["redis_version"])
    if int(version.split(".")[0]) < MIN_REDIS_MAJOR:
        raise SystemExit(
            f"benchmark: Redis {version} is too old: Redis Functions need 7.0"
        )
    keys = sum(db.get("keys", 0) for name, db in client.info("keyspace").items())
    if keys and not allow_flush:
        raise SystemExit(
            f"benchmark: the server contains {keys} keys, and the benchmark would "
            "flush them. Use a throwaway server, or pass --allow-flush"
        )
    return {
        "version": version,
        "os": info.get("os"),
        "arch_bits": info.get("arch_bits"),
    }


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_environment(client: redis.Redis, server: dict[str, Any]) -> dict[str, Any]:
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M"
        ),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "redis_server": server,
        "redis_py": package_version("redis"),
        "hiredis_parser": bool(redis.utils.HIREDIS_AVAILABLE),
        "concurrent_runs": package_version("concurrent-runs"),
        "library_version": client.fcall_ro("runs_version", 0).decode(),
        "optional_packages": {
            name: package_version(name) for name in OPTIONAL_PACKAGES
        },
    }


def run(url: str, settings: Settings, progress: Progress) -> tuple[dict[str, Any], Any]:
    client = redis.Redis.from_url(url, socket_timeout=60)
    results: dict[str, Any] = {"settings": settings.as_dict()}
    try:
        server = check_server(client, allow_flush=True)
        client.flushall()
        client.function_load(library_source(), replace=True)
        load_yardstick(client)
        results["environment"] = describe_environment(client, server)

        pairs, samples = measure_pairs(url, settings, progress)
        results["pairs"] = pairs
        results["server_time"] = measure_server_time(client, settings, progress)
        results["contention"] = measure_contention(url, client, settings, progress)

        saved = enable_full_slowlog(client, slowlog_length(settings))
        try:
            results["worst_call"] = measure_worst_call(client, settings, progress)
            results["scaling"] = measure_scaling(client, settings, progress)
        finally:
            restore_config(client, saved)
        results["environment"]["load_average_at_end"] = list(os.getloadavg())
    finally:
        client.flushall()
        delete_yardstick(client)
        client.close()
    return results, samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    progress = Progress()
    progress(f"benchmark: {settings.mode} run")
    with redis_server(args.redis_url, progress) as (url, started_here):
        if not started_here:
            with redis.Redis.from_url(url) as client:
                check_server(client, args.allow_flush)
        results, samples = run(url, settings, progress)
    results["environment"]["server_started_by_benchmark"] = started_here
    written = write_report(args.out, results, samples)
    for path in written:
        progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
