"""The asyncio limiter, on redis.asyncio; the same operations as the sync one."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from types import TracebackType
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry

from . import _core
from ._core import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_SLOT_TIMEOUT_S,
    DEFAULT_SOCKET_TIMEOUT_S,
    AwaitResult,
    FunctionCall,
    KeyT,
    LimiterCore,
    LoadLibrary,
    LostCallback,
    Operation,
    Request,
    Sleep,
    SlotState,
    Subscribe,
    WaitForMessage,
)
from .client import client_options, cluster_from_env
from .errors import LimiterUnavailableError, SlotLimitReachedError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _cancel_pending() -> bool:
    """Return True when the current task has been asked to cancel."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())


class _Session:
    """The I/O state of one running operation: its subscription and stop flag."""

    def __init__(self, stop: asyncio.Event | None) -> None:
        self.stop = stop
        self.pubsub: Any = None
        self.aborting = False

    async def close(self) -> None:
        if self.pubsub is not None:
            pubsub, self.pubsub = self.pubsub, None
            await pubsub.aclose()


class AsyncConcurrentRunsLimiter:
    """The asyncio twin of ConcurrentRunsLimiter: same arguments, async methods."""

    def __init__(
        self,
        redis_url: str | None = None,
        slot_timeout: float = DEFAULT_SLOT_TIMEOUT_S,
        fail_open: bool = False,
        *,
        client: Any = None,
        key_prefix: KeyT = DEFAULT_KEY_PREFIX,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_S,
        cluster: bool | None = None,
    ) -> None:
        self._core = LimiterCore(slot_timeout, fail_open, key_prefix)
        if client is None:
            url = redis_url or _core.redis_url_from_env(os.environ)
            options = client_options(socket_timeout, redis.asyncio.retry.Retry)
            if cluster if cluster is not None else cluster_from_env():
                client = redis.asyncio.cluster.RedisCluster.from_url(url, **options)
            else:
                client = redis.asyncio.Redis.from_url(url, **options)
        self.client = client

    @property
    def slot_timeout(self) -> float:
        """Lease length in seconds."""
        return self._core.slot_timeout

    @property
    def fail_open(self) -> bool:
        return self._core.fail_open

    @property
    def key_prefix(self) -> KeyT:
        return self._core.key_prefix

    async def acquire(
        self, key: KeyT, max_slots: int, wait: float | None = None
    ) -> str | None:
        """Take a slot of ``key``; return its token, or None when none is free."""
        return await self._run(self._core.acquire(key, max_slots, wait))

    async def release(self, key: KeyT, token: KeyT) -> bool:
        """Free the slot; return False when ``token`` held no live slot."""
        return await self._run(self._core.release(key, token))

    async def extend(self, key: KeyT, token: KeyT, timeout: float | None = None) -> bool:
        """Make the lease end ``timeout`` seconds (default slot_timeout) from now."""
        return await self._run(self._core.extend(key, token, timeout))

    async def get_count(self, key: KeyT) -> int:
        """Return the number of live slots of ``key``."""
        return await self._run(self._core.get_count(key))

    async def get_holders(self, key: KeyT) -> dict[str, float]:
        """Return the live slots of ``key``: token to seconds left, soonest first."""
        return await self._run(self._core.get_holders(key))

    def slot(
        self,
        key: KeyT,
        max_slots: int,
        *,
        wait: float | None = None,
        renew: bool = False,
        on_lost: LostCallback | None = None,
    ) -> AsyncSlot:
        """Return an async context manager that holds a slot while its block runs."""
        return AsyncSlot(self, key, max_slots, wait=wait, renew=renew, on_lost=on_lost)

    def limit(
        self,
        key_template: str,
        max_slots: int,
        *,
        wait: float | None = None,
        renew: bool = False,
    ) -> Callable[[F], F]:
        """Decorate a coroutine function so that each call holds a slot."""
        _core.check_max_slots(max_slots)

        def decorate(func: F) -> F:
            @functools.wraps(func)
            async def limited(*args: Any, **kwargs: Any) -> Any:
                key = _core.format_key(key_template, func, args, kwargs)
                async with self.slot(key, max_slots, wait=wait, renew=renew):
                    return await func(*args, **kwargs)

            return limited  # type: ignore[return-value]

        return decorate

    async def close(self) -> None:
        """Close the Redis client's connections."""
        await self.client.aclose()

    async def __aenter__(self) -> AsyncConcurrentRunsLimiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # I/O -----------------------------------------------------------------------

    async def _run(self, operation: Operation[T], stop: asyncio.Event | None = None) -> T:
        """Drive an operation: perform each request it yields, send back the result.

        Once a cancellation has been thrown into the operation, the requests of
        its clean-up run shielded, so that a second cancel cannot cut them off.
        """
        session = _Session(stop)
        reply: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    if error is not None:
                        request = operation.throw(error)
                    else:
                        request = operation.send(reply)
                except StopIteration as finished:
                    return finished.value
                reply, error = None, None
                try:
                    reply = await self._perform_guarded(request, session)
                except asyncio.CancelledError as exc:
                    session.aborting = True
                    error = exc
                except BaseException as exc:
                    # redis.asyncio's pool can turn a cancel that arrives while
                    # a task waits for a connection into a ConnectionError.
                    if _cancel_pending() and not session.aborting:
                        session.aborting = True
                        error = asyncio.CancelledError()
                    else:
                        error = exc
        finally:
            await asyncio.shield(session.close())

    async def _perform_guarded(self, request: Request, session: _Session) -> Any:
        if not session.aborting:
            return await self._perform(request, session)
        task = asyncio.ensure_future(self._perform(request, session))
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    return task.result()

    async def _perform(self, request: Request, session: _Session) -> Any:
        if isinstance(request, FunctionCall):
            call = self.client.fcall_ro if request.read_only else self.client.fcall
            return await call(request.name, len(request.keys), *request.keys, *request.args)
        if isinstance(request, LoadLibrary):
            return await self.client.function_load(request.source)
        if isinstance(request, Subscribe):
            session.pubsub = self.client.pubsub()
            await session.pubsub.ssubscribe(request.channel)
            return None
        if isinstance(request, WaitForMessage):
            return await self._wait_for_message(session.pubsub, request.timeout_s)
        if isinstance(request, Sleep):
            if session.stop is None:
                await asyncio.sleep(request.seconds)
                return False
            try:
                await asyncio.wait_for(session.stop.wait(), request.seconds)
            except asyncio.TimeoutError:
                return False
            return True
        if isinstance(request, AwaitResult):
            return await request.awaitable
        raise TypeError(f"unknown request {request!r}")

    @staticmethod
    async def _wait_for_message(pubsub: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            message = await pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=remaining
            )
            if message is not None:
                return True


class AsyncSlot(SlotState):
    """A slot held for an ``async with`` block; see AsyncConcurrentRunsLimiter.slot."""

    def __init__(
        self,
        limiter: AsyncConcurrentRunsLimiter,
        key: KeyT,
        max_slots: int,
        *,
        wait: float | None = None,
        renew: bool = False,
        on_lost: LostCallback | None = None,
    ) -> None:
        super().__init__(key, max_slots, wait, renew, on_lost)
        self._limiter = limiter
        self._stop = asyncio.Event()
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> str:
        token = await self._limiter.acquire(self.key, self.max_slots, wait=self.wait)
        if token is None:
            raise SlotLimitReachedError(self.key, self.max_slots, self.wait)
        self.token = token
        if self.renew:
            renewal = self._limiter._core.keep_renewed(self.key, token, self)
            self._renewer = asyncio.ensure_future(self._limiter._run(renewal, self._stop))
        return token

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Shielded, so that a task cancelled inside the block still gives its
        # slot back before the cancellation goes on.
        await asyncio.shield(self._give_back())

    async def _give_back(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            await self._renewer
        if self.token is None:
            return
        try:
            await self._limiter.release(self.key, self.token)
        except LimiterUnavailableError as error:
            _core.logger.warning(
                "could not release slot %s of %r; it frees itself when its lease "
                "ends: %s",
                self.token,
                self.key,
                error,
            )


_shared_limiter: AsyncConcurrentRunsLimiter | None = None


def get_async_concurrent_limiter() -> AsyncConcurrentRunsLimiter:
    """Return the process-wide asyncio limiter, built once from the environment."""
    global _shared_limiter
    if _shared_limiter is None:
        _shared_limiter = AsyncConcurrentRunsLimiter(
            **_core.limiter_settings_from_env(os.environ)
        )
    return _shared_limiter


def async_acquire_slot(
    key: KeyT,
    max_slots: int,
    *,
    wait: float | None = None,
    renew: bool = False,
    on_lost: LostCallback | None = None,
) -> AsyncSlot:
    """Hold a slot of the process-wide limiter: ``async with async_acquire_slot(k, 3)``."""
    return get_async_concurrent_limiter().slot(
        key, max_slots, wait=wait, renew=renew, on_lost=on_lost
    )
