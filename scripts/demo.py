#!/usr/bin/env python3
"""Show concurrent-runs limiting runs of several keys across processes.

Usage: python scripts/demo.py [--keep-server]

Without REDIS_URL the demo starts a throwaway redis-server on a free
127.0.0.1 port in a temporary folder, and stops it at the end. With REDIS_URL
it uses that server under a key prefix of its own, and leaves it running.
Then it

1. deploys the library with ``concurrent-runs load``;
2. runs worker processes that start runs of three keys, each key with its own
   limit, and kills one worker with SIGKILL while it holds a slot, so that its
   slot comes back only when its lease ends;
3. lets processes wait in line for the one slot of a key and compares the
   order in which they began waiting with the order in which they got it;
4. shows the state of a key with ``redis-cli FCALL`` and ``concurrent-runs``.

Peak concurrency comes from Redis server time: each run reads TIME after its
acquire returned and before its release started, so the measured interval lies
inside the real one and two measured runs overlap only if the real runs did.

Exit status 0 means every check held. Status 1 means a limit was exceeded, the
killed worker's slot did not come back, or waiters were served out of order.
Status 2 means the demo could not set up, for example without a redis-server
or after a failed deploy.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from concurrent_runs import ConcurrentRunsLimiter, SlotLimitReachedError
from concurrent_runs_loader import LoaderError, deploy_library

KEY_LIMITS = {
    "agent:summarize": 3,
    "agent:translate": 2,
    "tenant-42:agent:search": 1,
}
DEFAULT_KEY_PREFIX = "concurrent_runs:"  # the key_prefix default of the limiter
CRASH_KEY = "agent:summarize"
WAIT_KEY = "tenant-42:agent:search"

SLOT_TIMEOUT_S = 2.0  # short, so that the killed worker's slot comes back soon
LOAD_WORKERS = 6
LOAD_SECONDS = 6.0
RUN_SECONDS = (0.1, 0.8)
RETRY_PAUSE_SECONDS = (0.02, 0.08)
CRASH_AFTER_S = 1.0
STATUS_EVERY_S = 0.5

WAITERS = 5
WAITER_GAP_S = 0.05
WAITER_RUN_S = 0.1
WAIT_LIMIT_S = 15.0

READY_TIMEOUT_S = 60.0
SERVER_START_TIMEOUT_S = 10.0

EXIT_CHECK_FAILED = 1
EXIT_SETUP_FAILED = 2
EXIT_INTERRUPTED = 130


class SetupError(Exception):
    """The demo could not get a Redis server or deploy the library."""


# Redis server ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ThrowawayRedis:
    """A redis-server on 127.0.0.1 in a temporary folder, persistence off."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError(
                "redis-server not found on PATH: install Redis 7.0 or newer "
                "(Debian/Ubuntu: apt-get install redis-server), or set REDIS_URL"
            )
        self.binary = binary
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="concurrent-runs-demo-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(self.folder / "redis.log"),
        ]
        # A session of its own keeps Ctrl-C from stopping the server before
        # the demo has finished with it; stop() ends it either way.
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        try:
            while True:
                if self.process.poll() is not None:
                    raise SetupError(
                        f"redis-server exited with code {self.process.returncode}; "
                        f"see {self.folder / 'redis.log'}"
                    )
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise SetupError(f"redis-server on port {self.port} did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def wait(self) -> None:
        """Wait until the server exits or the user presses Ctrl-C."""
        assert self.process is not None
        try:
            self.process.wait()
        except KeyboardInterrupt:
            print()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


def hide_password(url: str) -> str:
    """Return the URL with its password, if any, replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def server_time_us(client: redis.Redis) -> int:
    """Return Redis server time (TIME) in microseconds."""
    seconds, microseconds = client.time()
    return seconds * 1_000_000 + microseconds


def redis_major_version(url: str) -> tuple[str, int]:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        version = str(client.info("server")["redis_version"])
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise SetupError(f"could not reach Redis at {hide_password(url)}: {exc}") from exc
    finally:
        client.close()
    return version, int(version.split(".")[0])


def deploy(url: str) -> None:
    """Deploy the library as ``concurrent-runs load`` does, twice.

    The second load changes nothing, which shows that a deploy step may run
    the command on every release.
    """
    for _ in range(2):
        print(f"  $ concurrent-runs load --url {hide_password(url)}")
        try:
            result = deploy_library(url)
        except LoaderError as exc:
            raise SetupError(f"concurrent-runs load failed: {exc}") from exc
        for node in result.nodes:
            print(f"    {node.describe()}")
        if not result.ok:
            raise SetupError("concurrent-runs load rejected the server (see above)")


# Worker processes -----------------------------------------------------------


def ignore_ctrl_c() -> None:
    """Leave Ctrl-C to the parent, which kills the workers it started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_worker(target: Any, number: int, results: Any, *args: Any) -> None:
    """Run a worker's body; report an exception to the parent instead of dying silently."""
    ignore_ctrl_c()
    try:
        target(number, results, *args)
    except Exception as exc:
        results.put(("failed", number, f"{type(exc).__name__}: {exc}"))
        raise


def load_worker(
    number: int, results: Any, url: str, key_prefix: str, seed: int, start: Any
) -> None:
    """Start runs of random keys for LOAD_SECONDS, without waiting for slots."""
    rng = random.Random(seed)
    keys = sorted(KEY_LIMITS)
    limiter = ConcurrentRunsLimiter(url, slot_timeout=SLOT_TIMEOUT_S, key_prefix=key_prefix)
    limiter.get_count(keys[0])  # checks the library and opens the connection
    results.put(("ready", number))
    start.wait()

    runs: list[tuple[str, int, int]] = []
    refused: Counter[str] = Counter()
    deadline = time.monotonic() + LOAD_SECONDS
    while time.monotonic() < deadline:
        key = rng.choice(keys)
        try:
            with limiter.slot(key, KEY_LIMITS[key]):
                acquired_us = server_time_us(limiter.client)
                time.sleep(rng.uniform(*RUN_SECONDS))
                released_us = server_time_us(limiter.client)
        except SlotLimitReachedError:
            refused[key] += 1
            time.sleep(rng.uniform(*RETRY_PAUSE_SECONDS))
            continue
        runs.append((key, acquired_us, released_us))
    limiter.close()
    results.put(("done", number, runs, dict(refused)))


def crashing_worker(
    number: int, results: Any, url: str, key_prefix: str, start: Any, report: Any
) -> None:
    """Take a slot of CRASH_KEY, report its token, then hang until killed.

    The token goes through a pipe of its own: a process killed right after a
    put on the shared queue may still hold that queue's lock.
    """
    limiter = ConcurrentRunsLimiter(url, slot_timeout=SLOT_TIMEOUT_S, key_prefix=key_prefix)
    limiter.get_count(CRASH_KEY)
    results.put(("ready", number))
    start.wait()

    time.sleep(CRASH_AFTER_S)
    with limiter.slot(CRASH_KEY, KEY_LIMITS[CRASH_KEY], wait=LOAD_SECONDS) as token:
        acquired_us = server_time_us(limiter.client)
        report.send((token, acquired_us))
        # The parent kills this process with SIGKILL during this run, so the
        # with block never exits and the slot is never released.
        time.sleep(60)


def waiting_worker(number: int, results: Any, url: str, key_prefix: str, go: Any) -> None:
    """Wait in line for the one slot of WAIT_KEY, hold it briefly, release it."""
    limiter = ConcurrentRunsLimiter(url, slot_timeout=SLOT_TIMEOUT_S, key_prefix=key_prefix)
    limiter.get_count(WAIT_KEY)
    results.put(("ready", number))
    go.wait()

    began_us = server_time_us(limiter.client)
    token = limiter.acquire(WAIT_KEY, KEY_LIMITS[WAIT_KEY], wait=WAIT_LIMIT_S)
    got_us = server_time_us(limiter.client)
    if token is None:
        results.put(("timed out", number, began_us, got_us))
        return
    time.sleep(WAITER_RUN_S)
    released_us = server_time_us(limiter.client)
    limiter.release(WAIT_KEY, token)
    limiter.close()
    results.put(("served", number, began_us, got_us, released_us))


# Measurements ----------------------------------------------------------------


@dataclass
class KeyStats:
    limit: int
    admitted: int = 0
    refused: int = 0
    intervals: list[tuple[int, int]] = field(default_factory=list)

    def peak(self) -> int:
        """Return the most intervals that overlap at one instant.

        At equal times a release counts before an acquire, because each
        interval lies inside the real run and so touching ends prove nothing.
        """
        events = []
        for acquired_us, released_us in self.intervals:
            events.append((acquired_us, 1))
            events.append((released_us, -1))
        events.sort(key=lambda event: (event[0], event[1]))
        running = peak = 0
        for _, change in events:
            running += change
            peak = max(peak, running)
        return peak


@dataclass
class Outcome:
    failures: list[str] = field(default_factory=list)

    def check(self, condition: bool, failure: str) -> None:
        if not condition:
            self.failures.append(failure)


def wait_for_ready(results: Any, count: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    ready = 0
    while ready < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SetupError(f"only {ready} of {count} worker processes started")
        message = results.get(timeout=remaining)
        if message[0] == "failed":
            raise SetupError(f"worker {message[1]} failed to start: {message[2]}")
        if message[0] != "ready":
            raise SetupError(f"unexpected message from a worker: {message!r}")
        ready += 1


def seconds_since(start: float) -> str:
    return f"+{time.monotonic() - start:4.1f}s"


# Scenes -----------------------------------------------------------------------


class LoadScene:
    """Worker processes start runs of every key; one of them is killed mid-run."""

    def __init__(
        self,
        context: Any,
        url: str,
        key_prefix: str,
        stats: dict[str, KeyStats],
        outcome: Outcome,
        processes: list[Any],
    ) -> None:
        self.context = context
        self.url = url
        self.key_prefix = key_prefix
        self.stats = stats
        self.outcome = outcome
        self.processes = processes
        self.results = context.Queue()
        self.start = context.Event()
        self.crasher_number = LOAD_WORKERS + 1
        self.crash_report, self.crash_sender = context.Pipe(duplex=False)
        self.crasher = context.Process(
            target=run_worker,
            args=(crashing_worker, self.crasher_number, self.results, url, key_prefix,
                  self.start, self.crash_sender),
            name=f"load worker {self.crasher_number}",
        )
        self.limiter: ConcurrentRunsLimiter | None = None
        self.started = 0.0
        self.workers_done = 0
        self.dead_token: str | None = None
        self.killed_at = 0.0
        self.dead_lease_end_us = 0
        self.dead_slot_back = False
        self.crasher_failed = False

    def run(self) -> None:
        print(
            f"\n2. Load: {LOAD_WORKERS} worker processes start runs of "
            f"{RUN_SECONDS[0]}-{RUN_SECONDS[1]} s for {LOAD_SECONDS:g} s "
            f"(slot_timeout {SLOT_TIMEOUT_S:g} s); worker {self.crasher_number} takes a "
            f"slot of {CRASH_KEY} and is killed with SIGKILL mid-run"
        )
        self.start_workers()
        self.limiter = ConcurrentRunsLimiter(
            self.url, slot_timeout=SLOT_TIMEOUT_S, key_prefix=self.key_prefix
        )
        try:
            self.watch()
        finally:
            self.limiter.close()
        self.outcome.check(
            self.workers_done == LOAD_WORKERS,
            f"only {self.workers_done} of {LOAD_WORKERS} load workers reported their runs",
        )
        self.outcome.check(
            self.dead_token is not None or self.crasher_failed,
            f"worker {self.crasher_number} never took a slot of {CRASH_KEY}",
        )
        self.outcome.check(
            self.dead_token is None or self.dead_slot_back,
            "the killed worker's slot never came free",
        )
        for process in self.processes:
            process.join(timeout=10)

    def start_workers(self) -> None:
        seed = secrets.randbits(32)
        for number in range(1, LOAD_WORKERS + 1):
            self.processes.append(
                self.context.Process(
                    target=run_worker,
                    args=(load_worker, number, self.results, self.url, self.key_prefix,
                          seed + number, self.start),
                    name=f"load worker {number}",
                )
            )
        self.processes.append(self.crasher)
        for process in self.processes:
            process.start()
        # With the parent's end closed, the pipe reports EOF if the crasher
        # exits without sending its token.
        self.crash_sender.close()
        wait_for_ready(self.results, LOAD_WORKERS + 1)

    def watch(self) -> None:
        """Collect results, kill the crasher, and print the live slots now and then."""
        self.started = time.monotonic()
        self.start.set()
        last_status = self.started
        give_up_at = self.started + LOAD_SECONDS + SLOT_TIMEOUT_S + 30
        while self.workers_done < LOAD_WORKERS or not (
            self.dead_slot_back or self.crasher_failed
        ):
            if time.monotonic() > give_up_at:
                return
            try:
                self.collect(self.results.get(timeout=0.05))
            except queue.Empty:
                pass
            if self.dead_token is None and not self.crasher_failed and self.crash_report.poll():
                self.receive_crash_report()
            watching = self.dead_token is not None and not self.dead_slot_back
            every_s = STATUS_EVERY_S if watching else 2 * STATUS_EVERY_S
            if time.monotonic() - last_status >= every_s:
                last_status = time.monotonic()
                self.print_status()

    def collect(self, message: tuple[Any, ...]) -> None:
        if message[0] == "failed":
            _, number, error = message
            if number == self.crasher_number:
                self.outcome.failures.append(f"worker {number} failed: {error}")
            else:
                self.workers_done += 1
                self.outcome.failures.append(f"load worker {number} failed: {error}")
            return
        _, _, runs, refused = message
        self.workers_done += 1
        for key, acquired_us, released_us in runs:
            self.stats[key].admitted += 1
            self.stats[key].intervals.append((acquired_us, released_us))
        for key, count in refused.items():
            self.stats[key].refused += count

    def receive_crash_report(self) -> None:
        try:
            token, acquired_us = self.crash_report.recv()
        except EOFError:
            # The pipe closes without a report when the worker ended early.
            self.crasher_failed = True
            self.outcome.failures.append(
                f"worker {self.crasher_number} exited before it took a slot of {CRASH_KEY}"
            )
            return
        self.kill_crasher(token, acquired_us)

    def kill_crasher(self, token: str, acquired_us: int) -> None:
        assert self.limiter is not None
        os.kill(self.crasher.pid, signal.SIGKILL)
        self.crasher.join()
        self.killed_at = time.monotonic()
        self.dead_token = token

        # TIME read before runs_holders is at most the server's own now, so
        # the lease end computed here is never later than the real one (to
        # the ms that runs_holders rounds to).
        before_us = server_time_us(self.limiter.client)
        seconds_left = self.limiter.get_holders(CRASH_KEY).get(token, 0.0)
        self.dead_lease_end_us = before_us + int(seconds_left * 1_000_000)
        self.stats[CRASH_KEY].admitted += 1
        self.stats[CRASH_KEY].intervals.append((acquired_us, self.dead_lease_end_us - 1000))
        print(
            f"  {seconds_since(self.started)}  killed worker {self.crasher_number} "
            f"(pid {self.crasher.pid}) with SIGKILL while it held a slot of {CRASH_KEY}; "
            f"its lease ends in {seconds_left:.2f} s"
        )

    def print_status(self) -> None:
        assert self.limiter is not None
        counts = "  ".join(
            f"{key} {self.limiter.get_count(key)}/{limit}" for key, limit in KEY_LIMITS.items()
        )
        note = ""
        if self.dead_token is not None and not self.dead_slot_back:
            holders = self.limiter.get_holders(CRASH_KEY)
            checked_us = server_time_us(self.limiter.client)
            if self.dead_token in holders:
                note = f"   dead worker's slot: {holders[self.dead_token]:.2f} s left"
            else:
                self.dead_slot_back = True
                after_s = time.monotonic() - self.killed_at
                note = f"   dead worker's slot is free again, {after_s:.1f} s after the kill"
                self.outcome.check(
                    checked_us >= self.dead_lease_end_us - 1000,
                    "the killed worker's slot came free before its lease ended",
                )
        elif self.workers_done < LOAD_WORKERS and time.monotonic() - self.started > LOAD_SECONDS:
            note = "   workers finish their last runs"
        print(f"  {seconds_since(self.started)}  live slots: {counts}{note}")


def run_waiters(
    context: Any, url: str, key_prefix: str, outcome: Outcome, processes: list[Any]
) -> None:
    """Processes wait in line for the one slot of WAIT_KEY, 50 ms apart."""
    limit = KEY_LIMITS[WAIT_KEY]
    print(
        f"\n3. Waiting in line: the demo holds the slot of {WAIT_KEY} (limit {limit}) "
        f"while {WAITERS} processes call acquire(wait={WAIT_LIMIT_S:g}) "
        f"{WAITER_GAP_S * 1000:.0f} ms apart"
    )
    results = context.Queue()
    go_events = [context.Event() for _ in range(WAITERS)]
    waiters = [
        context.Process(
            target=run_worker,
            args=(waiting_worker, number, results, url, key_prefix, go_events[number - 1]),
            name=f"waiter {number}",
        )
        for number in range(1, WAITERS + 1)
    ]
    processes.extend(waiters)
    for process in waiters:
        process.start()
    wait_for_ready(results, WAITERS)

    stats = KeyStats(limit)
    limiter = ConcurrentRunsLimiter(url, slot_timeout=30, key_prefix=key_prefix)
    try:
        held_token = limiter.acquire(WAIT_KEY, limit)
        if held_token is None:
            raise SetupError(f"the slot of {WAIT_KEY} is taken by another client")
        held_from_us = server_time_us(limiter.client)
        for go in go_events:
            go.set()
            time.sleep(WAITER_GAP_S)
        time.sleep(0.2)
        held_until_us = server_time_us(limiter.client)
        limiter.release(WAIT_KEY, held_token)
    finally:
        limiter.close()
    stats.intervals.append((held_from_us, held_until_us))

    served: list[tuple[int, int, int]] = []
    for _ in range(WAITERS):
        try:
            message = results.get(timeout=WAIT_LIMIT_S + 10)
        except queue.Empty:
            outcome.failures.append("a waiter never reported back")
            break
        if message[0] == "failed":
            outcome.failures.append(f"waiter {message[1]} failed: {message[2]}")
            continue
        if message[0] == "timed out":
            outcome.failures.append(f"waiter {message[1]} got no slot within {WAIT_LIMIT_S:g} s")
            continue
        _, number, began_us, got_us, released_us = message
        served.append((number, began_us, got_us))
        stats.admitted += 1
        stats.intervals.append((got_us, released_us))
    for process in waiters:
        process.join(timeout=10)
    if not served:
        return

    origin_us = min(began_us for _, began_us, _ in served)

    def since_first(time_us: int) -> str:
        return f"{(time_us - origin_us) / 1000:+5.0f} ms"

    by_start = sorted(served, key=lambda entry: entry[1])
    by_grant = sorted(served, key=lambda entry: entry[2])
    began = "  ".join(f"w{number} {since_first(began_us)}" for number, began_us, _ in by_start)
    granted = "  ".join(f"w{number} {since_first(got_us)}" for number, _, got_us in by_grant)
    in_order = [entry[0] for entry in by_start] == [entry[0] for entry in by_grant]
    peak = stats.peak()
    print(f"  began waiting:  {began}")
    print(f"  the demo released its slot at {since_first(held_until_us).strip()}")
    print(f"  got the slot:   {granted}")
    print(f"  served in the order they began: {'yes' if in_order else 'NO'}")
    print(f"  peak: {peak} run at once (limit {limit})")
    outcome.check(in_order, "waiters were not served in the order they began waiting")
    outcome.check(
        peak <= limit, f"{WAIT_KEY} had {peak} runs at once while waiters were served"
    )


def print_key_table(stats: dict[str, KeyStats], outcome: Outcome) -> None:
    print("\n   key                      limit  admitted  refused  peak")
    for key, entry in stats.items():
        peak = entry.peak()
        marker = "" if peak <= entry.limit else "   LIMIT EXCEEDED"
        print(
            f"   {key:<24} {entry.limit:>5} {entry.admitted:>9} {entry.refused:>8}"
            f" {peak:>5}{marker}"
        )
        outcome.check(
            peak <= entry.limit, f"{key} had {peak} runs at once, above its limit {entry.limit}"
        )
    print(
        "   peak: the most runs at once, from Redis TIME read after each acquire and"
        " before each\n   release; the killed worker's run lasts until its lease ended"
    )


def redis_cli_connection(
    url: str, server: ThrowawayRedis | None
) -> tuple[list[str], dict[str, str], str]:
    """Return redis-cli's arguments and environment, and the command line to show.

    The password goes in REDISCLI_AUTH, as redis-cli recommends, and is shown
    as ***.
    """
    environment = dict(os.environ)
    if server is not None:
        return ["-p", str(server.port)], environment, f"redis-cli -p {server.port}"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        arguments = ["-s", parts.path]
    else:
        arguments = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        database = parts.path.strip("/")
        if database and database != "0":
            arguments += ["-n", database]
        if parts.scheme == "rediss":
            arguments.append("--tls")
    if parts.username:
        arguments += ["--user", parts.username]
    shown = "redis-cli " + " ".join(arguments)
    if parts.password is not None:
        environment["REDISCLI_AUTH"] = parts.password
        shown = f"REDISCLI_AUTH=*** {shown}"
    return arguments, environment, shown


def run_shown(command: list[str], shown: str, environment: dict[str, str] | None = None) -> None:
    """Print a command as a person would type it, then run it and print its output."""
    print(f"  $ {shown}")
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=30, check=False, env=environment
    )
    for line in (finished.stdout + finished.stderr).splitlines():
        print(f"    {line}")


def show_by_hand(url: str, key_prefix: str, server: ThrowawayRedis | None) -> None:
    """Show the state that the limiter keeps with redis-cli and concurrent-runs."""
    key = f"{key_prefix}{CRASH_KEY}"
    limit = KEY_LIMITS[CRASH_KEY]
    timeout_ms = 30_000
    print(
        f"\n4. By hand: the demo holds one slot of {CRASH_KEY}; redis-cli sees it, "
        "then takes and frees another"
    )
    connect, environment, connect_shown = redis_cli_connection(url, server)
    calls = [
        ["FCALL_RO", "runs_version", "0"],
        ["FCALL_RO", "runs_count", "1", key],
        ["FCALL", "runs_acquire", "1", key, str(limit), str(timeout_ms), "by-hand"],
        ["FCALL_RO", "runs_holders", "1", key],
        ["FCALL", "runs_release", "1", key, "by-hand"],
        ["FCALL_RO", "runs_count", "1", key],
    ]
    redis_cli = shutil.which("redis-cli")
    limiter = ConcurrentRunsLimiter(url, slot_timeout=timeout_ms / 1000, key_prefix=key_prefix)
    token = limiter.acquire(CRASH_KEY, limit)
    try:
        for call in calls:
            shown = f"{connect_shown} {' '.join(call)}"
            if redis_cli is None:
                print(f"  $ {shown}")
            else:
                run_shown([redis_cli, "--no-raw", *connect, *call], shown, environment)

        command = shutil.which("concurrent-runs", path=str(Path(sys.executable).parent))
        if command is not None:
            prefix = [] if key_prefix == DEFAULT_KEY_PREFIX else ["--prefix", key_prefix]
            arguments = ["holders", CRASH_KEY, "--url", url, *prefix]
            shown_arguments = ["holders", CRASH_KEY, "--url", hide_password(url), *prefix]
            run_shown([command, *arguments], f"concurrent-runs {' '.join(shown_arguments)}")
    finally:
        if token is not None:
            limiter.release(CRASH_KEY, token)
        limiter.close()
    if redis_cli is None:
        print("  (redis-cli not found, so these lines were not run; Debian/Ubuntu: "
              "apt-get install redis-tools)")


# Main --------------------------------------------------------------------------


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Show concurrent-runs limiting runs of several keys across processes."
    )
    parser.add_argument(
        "--keep-server",
        action="store_true",
        help="keep the throwaway redis-server running until Ctrl-C, to try redis-cli by hand",
    )
    return parser.parse_args(argv)


def run_demo(url: str, key_prefix: str, server: ThrowawayRedis | None) -> Outcome:
    outcome = Outcome()
    processes: list[Any] = []
    context = multiprocessing.get_context("spawn")
    stats = {key: KeyStats(limit) for key, limit in KEY_LIMITS.items()}
    try:
        LoadScene(context, url, key_prefix, stats, outcome, processes).run()
        print_key_table(stats, outcome)
        run_waiters(context, url, key_prefix, outcome, processes)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    show_by_hand(url, key_prefix, server)
    return outcome


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    started = time.monotonic()
    server: ThrowawayRedis | None = None
    try:
        url = os.environ.get("REDIS_URL")
        if url:
            key_prefix = f"concurrent_runs:demo-{secrets.token_hex(3)}:"
            where = f"the server at REDIS_URL ({hide_password(url)}), keys under {key_prefix}"
        else:
            server = ThrowawayRedis()
            server.start()
            url = server.url
            key_prefix = DEFAULT_KEY_PREFIX
            where = f"a throwaway redis-server on 127.0.0.1:{server.port} ({server.folder})"
        version, major = redis_major_version(url)
        if major < 7:
            raise SetupError(f"Redis {version} has no Redis Functions: use Redis 7.0 or newer")
        print(f"concurrent-runs demo on Redis {version}: {where}")
        print("\n1. Deploy the library (idempotent)")
        deploy(url)

        outcome = run_demo(url, key_prefix, server)

        print(f"\nFinished in {time.monotonic() - started:.1f} s.")
        for failure in outcome.failures:
            print(f"FAILED: {failure}")
        if not outcome.failures:
            print(
                "OK: no key ever had more runs than its limit, the killed worker's slot "
                "came back when its lease ended, and waiters were served in order."
            )
        if server is not None and arguments.keep_server:
            print(f"redis-server keeps running on port {server.port}; press Ctrl-C to stop it.")
            server.wait()
        return EXIT_CHECK_FAILED if outcome.failures else 0
    except SetupError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
