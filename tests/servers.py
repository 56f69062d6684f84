"""Throwaway redis-server processes on 127.0.0.1 for the test suite."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

LOCALHOST = "127.0.0.1"
START_TIMEOUT_S = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS server: its CA certificate, certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path


class RedisServer:
    """One redis-server process in its own folder, persistence off by default.

    ``extra_args`` are passed to redis-server as ``--name value`` pairs, for
    example ``["--appendonly", "yes"]``. With ``tls`` the server listens for
    TLS only, on ``port``, and does not ask clients for certificates.
    """

    def __init__(
        self,
        folder: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.binary = binary or redis_server_binary()
        self.tls = tls
        if self.binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{LOCALHOST}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def command_line(self) -> list[str]:
        persistence = ["--save", "", "--appendonly", "no"]
        listen = ["--port", str(self.port)]
        if self.tls:
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca_cert),
                "--tls-auth-clients", "no",
            ]
        return [
            self.binary,
            *listen,
            "--bind", LOCALHOST,
            "--dir", str(self.folder),
            "--daemonize", "no",
            "--logfile", str(self.folder / "redis.log"),
            *persistence,
            *self.extra_args,
        ]

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            self.command_line(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.folder,
        )
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        # No retries: redis-py's default retries an AuthenticationError for seconds.
        client = self.client(socket_timeout=1, retry=Retry(NoBackoff(), 0))
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with code "
                        f"{self.process.returncode}:\n{log}"
                    )
                try:
                    if client.ping():
                        return
                except redis.AuthenticationError:
                    return  # it answers, and wants a password (--requirepass)
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def client(self, **options: object) -> redis.Redis:
        if self.tls:
            options = {"ssl": True, "ssl_ca_certs": str(self.tls.ca_cert), **options}
        return redis.Redis(host=LOCALHOST, port=self.port, **options)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        """Stop the server; SIGKILL after 5 s if SIGTERM did not end it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
