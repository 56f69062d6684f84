"""A throwaway redis-server on 127.0.0.1 for one benchmark run."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

LOCALHOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


class ThrowawayRedis:
    """A redis-server in a temporary folder, persistence off, DEBUG allowed locally.

    DEBUG POPULATE fills the server with keys quickly, and Redis 7 rejects
    DEBUG unless enable-debug-command allows it.
    """

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server not found on PATH: install Redis 7.0 or newer, "
                "or pass --redis-url of a throwaway server"
            )
        self.binary = binary
        self.port = free_port()
        self.folder: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self) -> ThrowawayRedis:
        self.folder = tempfile.TemporaryDirectory(prefix="concurrent-runs-bench-")
        folder = Path(self.folder.name)
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            LOCALHOST,
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "local",
            "--logfile",
            str(folder / "redis.log"),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder
        )
        self._wait_until_ready(folder)
        return self

    def _wait_until_ready(self, folder: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis(host=LOCALHOST, port=self.port, socket_timeout=1)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    log = (folder / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with code "
                        f"{self.process.returncode}:\n{log}"
                    )
                try:
                    if client.ping():
                        return
                except (
                    redis.ConnectionError,
                    redis.TimeoutError,
                    redis.BusyLoadingError,
                ):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not respond within "
                        f"{START_TIMEOUT_S:.0f} s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGKILL if SIGTERM takes too long) and remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None

    def __enter__(self) -> ThrowawayRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
