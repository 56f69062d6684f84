"""Inspect and free the slots of one limit key, for operators.

``SlotAdmin`` calls the library's functions on a Redis key. On a cluster it
uses redis-py's RedisCluster, which sends each call to the node that owns the
key's hash slot. It never loads the library: a server without it gets an
error that names ``concurrent-runs load``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import redis.cluster
from redis.exceptions import RedisClusterException, RedisError

from concurrent_runs._core import as_text
from concurrent_runs.library import (
    FN_COUNT,
    FN_HOLDERS,
    FN_RELEASE,
    FN_REAP,
    LIBRARY_NAME,
    REAP_BATCH,
)

from .nodes import (
    CONNECT_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    LoaderError,
    Topology,
    describe_redis_error,
    entry_node,
    is_function_missing,
    open_client,
    parse_settings,
)


@dataclass(frozen=True)
class Holder:
    """A live slot: its token and the time until its lease ends."""

    token: str
    ms_left: int

    @property
    def seconds_left(self) -> float:
        return self.ms_left / 1000


class SlotAdmin:
    """Calls of the library functions on limit keys, on a server or a cluster.

    ``url`` names a plain server or any node of a cluster. Raises LoaderError
    when that server is unreachable, rejects the login or is older than Redis
    7.0.
    """

    def __init__(self, url: str) -> None:
        settings = parse_settings(url)
        entry = entry_node(settings)
        with Topology.discover(url) as topology:
            self.cluster = topology.cluster
        self.client: redis.Redis | redis.cluster.RedisCluster
        if not self.cluster:
            self.address = entry.address
            self.client = open_client(settings, entry)
            return

        self.address = f"the cluster at {entry.address}"
        try:
            self.client = redis.cluster.RedisCluster.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
            )
        except (RedisError, RedisClusterException) as exc:
            raise LoaderError(f"Could not connect to {self.address}: {exc}") from exc

    def count(self, redis_key: str) -> int:
        """Return the number of live slots at ``redis_key``."""
        return int(self._call(FN_COUNT, redis_key, read_only=True))

    def holders(self, redis_key: str) -> list[Holder]:
        """Return the live slots at ``redis_key``, soonest to end first."""
        flat = self._call(FN_HOLDERS, redis_key, read_only=True)
        return [
            Holder(as_text(flat[index]), int(flat[index + 1]))
            for index in range(0, len(flat), 2)
        ]

    def release(self, redis_key: str, token: str) -> bool:
        """Free ``token``'s slot; return False when it held no live slot."""
        return int(self._call(FN_RELEASE, redis_key, token)) == 1

    def reap(self, redis_key: str) -> int:
        """Remove every ended slot at ``redis_key``; return how many were removed.

        Each runs_reap call removes at most REAP_BATCH slots, so the loop
        calls again while a call removed a full batch.
        """
        total = 0
        while True:
            removed = int(self._call(FN_REAP, redis_key))
            total += removed
            if removed < REAP_BATCH:
                return total

    def _call(
        self, function: str, redis_key: str, *args: str, read_only: bool = False
    ) -> Any:
        """Call a library function on one key; raise LoaderError on any error."""
        fcall = self.client.fcall_ro if read_only else self.client.fcall
        try:
            return fcall(function, 1, redis_key, *args)
        except RedisClusterException as exc:
            raise LoaderError(
                f"Could not run {function} on key {redis_key!r}: {exc}"
            ) from exc
        except RedisError as exc:
            raise LoaderError(self._describe(function, redis_key, exc)) from exc

    def _describe(self, function: str, redis_key: str, exc: RedisError) -> str:
        action = f"run {function} on key {redis_key!r}"
        if is_function_missing(exc):
            return (
                f"Could not {action}: the {LIBRARY_NAME} library is not loaded on "
                f"{self.address}; run `concurrent-runs load`"
            )
        if str(exc).startswith("WRONGTYPE"):
            return (
                f"Could not {action}: the key holds another type of value, not a "
                f"{LIBRARY_NAME} sorted set; check KEY and --prefix"
            )
        return describe_redis_error(action, self.address, exc)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SlotAdmin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
