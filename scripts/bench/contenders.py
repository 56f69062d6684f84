"""The contenders: one acquire+release pair each, sync and asyncio.

Every contender builds a ``pair`` callable from a ready client. Calling it
takes one slot (or lock) and gives it back. It raises when the slot was not
granted, so a broken contender cannot look fast. Each library is used the way
its documentation shows: redis-py's Lock and python-redis-lock build a lock
object per use, the redis-rate-limiters semaphore is built once and entered
per use, and this package's limiter is built once and called per use.
"""

from __future__ import annotations

import importlib
import secrets
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import redis
import redis.asyncio

from concurrent_runs import AsyncConcurrentRunsLimiter, ConcurrentRunsLimiter

MAX_SLOTS = 3
LEASE_S = 300
LEASE_MS = LEASE_S * 1000
KEY_PREFIX = "bench:pair:"

SyncPair = Callable[[], None]
AsyncPair = Callable[[], Awaitable[None]]


class NotInstalledError(Exception):
    """An optional package that a contender needs is not installed."""

    def __init__(self, package: str) -> None:
        super().__init__(f"{package} not installed")
        self.package = package


def import_optional(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NotInstalledError(package) from None


def new_token() -> str:
    """Return a token like the limiter's own: 128 random bits as hex."""
    return secrets.token_hex(16)


class NotGrantedError(RuntimeError):
    """A contender found its slot taken although no other client has it."""


# The hand-written limiter ----------------------------------------------------


class WatchLimiter:
    """A limiter as it is often written by hand: a set of tokens plus a key per token.

    Each token key carries the lease as its TTL, and the set lists the
    tokens. ``acquire`` WATCHes the set, reads its members and which of
    their token keys still exist, then in MULTI/EXEC removes the tokens whose
    key has expired, adds the new token and writes its key with a TTL. When
    another client changed the set in between, EXEC fails and acquire
    starts again.
    """

    def __init__(self, client: redis.Redis, max_slots: int, lease_s: int) -> None:
        self.client = client
        self.max_slots = max_slots
        self.lease_s = lease_s

    @staticmethod
    def set_key(name: str) -> str:
        return f"bench:watch:{name}"

    @staticmethod
    def token_key(set_key: str, token: str) -> str:
        return f"{set_key}:{token}"

    def acquire(self, name: str) -> str | None:
        set_key = self.set_key(name)
        token = new_token()
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(set_key)
                    members = [member.decode() for member in pipe.smembers(set_key)]
                    alive = []
                    if members:
                        alive = pipe.mget([self.token_key(set_key, m) for m in members])
                    expired = [m for m, value in zip(members, alive) if value is None]
                    if len(members) - len(expired) >= self.max_slots:
                        pipe.unwatch()
                        return None

                    pipe.multi()
                    if expired:
                        pipe.srem(set_key, *expired)
                    pipe.sadd(set_key, token)
                    pipe.set(self.token_key(set_key, token), 1, ex=self.lease_s)
                    pipe.execute()
                    return token
                except redis.WatchError:
                    continue

    def release(self, name: str, token: str) -> None:
        set_key = self.set_key(name)
        with self.client.pipeline() as pipe:
            pipe.srem(set_key, token)
            pipe.delete(self.token_key(set_key, token))
            pipe.execute()


# Sync pairs ------------------------------------------------------------------


def floor_pair(client: redis.Redis) -> SyncPair:
    def pair() -> None:
        client.ping()
        client.ping()

    return pair


def limiter_pair(client: redis.Redis) -> SyncPair:
    limiter = ConcurrentRunsLimiter(
        client=client, key_prefix=KEY_PREFIX, slot_timeout=LEASE_S
    )

    def pair() -> None:
        token = limiter.acquire("limiter", MAX_SLOTS)
        if token is None:
            raise NotGrantedError("ConcurrentRunsLimiter.acquire returned None")
        limiter.release("limiter", token)

    return pair


def fcall_pair(client: redis.Redis) -> SyncPair:
    key = KEY_PREFIX + "fcall"

    def pair() -> None:
        token = new_token()
        if client.fcall("runs_acquire", 1, key, MAX_SLOTS, LEASE_MS, token) != 1:
            raise NotGrantedError("runs_acquire returned 0")
        client.fcall("runs_release", 1, key, token)

    return pair


def watch_pair(client: redis.Redis) -> SyncPair:
    limiter = WatchLimiter(client, MAX_SLOTS, LEASE_S)

    def pair() -> None:
        token = limiter.acquire("watch")
        if token is None:
            raise NotGrantedError("the WATCH/MULTI limiter returned None")
        limiter.release("watch", token)

    return pair


def redis_lock_pair(client: redis.Redis) -> SyncPair:
    name = KEY_PREFIX + "redis-py-lock"

    def pair() -> None:
        lock = client.lock(name, timeout=LEASE_S)
        if not lock.acquire(blocking=False):
            raise NotGrantedError("redis-py Lock.acquire returned False")
        lock.release()

    return pair


def python_redis_lock_pair(client: redis.Redis) -> SyncPair:
    redis_lock = import_optional("redis_lock", "python-redis-lock")
    name = KEY_PREFIX + "python-redis-lock"

    def pair() -> None:
        lock = redis_lock.Lock(client, name, expire=LEASE_S)
        if not lock.acquire(blocking=False):
            raise NotGrantedError("python-redis-lock Lock.acquire returned False")
        lock.release()

    return pair


def limiters_semaphore_pair(client: redis.Redis) -> SyncPair:
    limiters = import_optional("limiters", "redis-rate-limiters")
    # max_sleep bounds BLPOP, so a semaphore that lost its tokens fails the
    # run instead of blocking it forever.
    semaphore = limiters.SyncSemaphore(
        connection=client, name="bench", capacity=MAX_SLOTS, max_sleep=5, expiry=LEASE_S
    )

    def pair() -> None:
        with semaphore:
            pass

    return pair


# Asyncio pairs -----------------------------------------------------------------


def async_floor_pair(client: redis.asyncio.Redis) -> AsyncPair:
    async def pair() -> None:
        await client.ping()
        await client.ping()

    return pair


def async_limiter_pair(client: redis.asyncio.Redis) -> AsyncPair:
    limiter = AsyncConcurrentRunsLimiter(
        client=client, key_prefix=KEY_PREFIX, slot_timeout=LEASE_S
    )

    async def pair() -> None:
        token = await limiter.acquire("async-limiter", MAX_SLOTS)
        if token is None:
            raise NotGrantedError("AsyncConcurrentRunsLimiter.acquire returned None")
        await limiter.release("async-limiter", token)

    return pair


def async_fcall_pair(client: redis.asyncio.Redis) -> AsyncPair:
    key = KEY_PREFIX + "async-fcall"

    async def pair() -> None:
        token = new_token()
        if await client.fcall("runs_acquire", 1, key, MAX_SLOTS, LEASE_MS, token) != 1:
            raise NotGrantedError("runs_acquire returned 0")
        await client.fcall("runs_release", 1, key, token)

    return pair


def async_redis_lock_pair(client: redis.asyncio.Redis) -> AsyncPair:
    name = KEY_PREFIX + "async-redis-py-lock"

    async def pair() -> None:
        lock = client.lock(name, timeout=LEASE_S)
        if not await lock.acquire(blocking=False):
            raise NotGrantedError("redis-py asyncio Lock.acquire returned False")
        await lock.release()

    return pair


def async_limiters_semaphore_pair(client: redis.asyncio.Redis) -> AsyncPair:
    limiters = import_optional("limiters", "redis-rate-limiters")
    semaphore = limiters.AsyncSemaphore(
        connection=client,
        name="bench-async",
        capacity=MAX_SLOTS,
        max_sleep=5,
        expiry=LEASE_S,
    )

    async def pair() -> None:
        async with semaphore:
            pass

    return pair


# The table of contenders ---------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One way to take and give back a slot, in one I/O mode."""

    name: str
    label: str
    mode: str  # "sync" or "async"
    build: Callable[[Any], Callable[[], Any]]
    package: str | None = None  # the optional package it needs, if any
    is_floor: bool = False

    @property
    def key(self) -> str:
        return f"{self.mode}:{self.name}"


CONTENDERS = (
    Contender(
        "floor", "two PING round trips (floor)", "sync", floor_pair, is_floor=True
    ),
    Contender("limiter", "ConcurrentRunsLimiter acquire+release", "sync", limiter_pair),
    Contender("fcall", "raw FCALL runs_acquire + runs_release", "sync", fcall_pair),
    Contender(
        "watch", "hand-written WATCH/MULTI limiter (set + TTL keys)", "sync", watch_pair
    ),
    Contender("redis_lock", "redis-py Lock acquire+release", "sync", redis_lock_pair),
    Contender(
        "python_redis_lock",
        "python-redis-lock Lock acquire+release",
        "sync",
        python_redis_lock_pair,
        package="python-redis-lock",
    ),
    Contender(
        "limiters_semaphore",
        "redis-rate-limiters SyncSemaphore enter+exit",
        "sync",
        limiters_semaphore_pair,
        package="redis-rate-limiters",
    ),
    Contender(
        "floor",
        "two PING round trips (floor)",
        "async",
        async_floor_pair,
        is_floor=True,
    ),
    Contender(
        "limiter",
        "AsyncConcurrentRunsLimiter acquire+release",
        "async",
        async_limiter_pair,
    ),
    Contender(
        "fcall", "raw FCALL runs_acquire + runs_release", "async", async_fcall_pair
    ),
    Contender(
        "redis_lock",
        "redis-py asyncio Lock acquire+release",
        "async",
        async_redis_lock_pair,
    ),
    Contender(
        "limiters_semaphore",
        "redis-rate-limiters AsyncSemaphore enter+exit",
        "async",
        async_limiters_semaphore_pair,
        package="redis-rate-limiters",
    ),
)
