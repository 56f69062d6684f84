"""The asyncio limiter, on redis.asyncio; the same operations as the sync one."""

from __future__ import annotations

import asyncio
import functools
import os
import time
import weakref
from types import TracebackType
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
from redis.exceptions import ResponseError

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
    Unsubscribe,
    WaitForMessage,
)
from ._wakeups import AsyncWakeups, as_bytes, async_wait_flag
from .client import (
    check_read_from_replicas,
    client_options,
    cluster_from_env,
    merge_cluster_loads,
    merge_cluster_versions,
    replica_read_options,
)
from .errors import ConcurrentRunsError, LimiterUnavailableError, SlotLimitReachedError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _cancel_requests() -> int:
    """Return how many cancels of the current task are pending.

    Always 0 before Python 3.11, whose tasks do not count cancel requests.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling() if cancelling else 0


class _Session:
    """The I/O state of one running operation: its subscription and stop flag.

    As in the sync limiter, a waiter on a single server registers with the
    limiter's shared subscription, and on a cluster it subscribes on its own.
    """

    def __init__(self, stop: asyncio.Event | None, wakeups: AsyncWakeups | None) -> None:
        self.stop = stop
        self.wakeups = wakeups
        self.channel: KeyT | None = None
        self.token: KeyT | None = None
        self.flag: asyncio.Event | None = None
        self.pubsub: Any = None
        self.aborting = False

    @property
    def subscribed(self) -> bool:
        return self.flag is not None or self.pubsub is not None

    async def subscribe(self, client: Any, channel: KeyT, token: KeyT) -> bool:
        self.channel, self.token = channel, token
        if self.wakeups is not None:
            self.flag, already_active = await self.wakeups.register(channel, token)
            return already_active
        self.pubsub = client.pubsub()
        await self.pubsub.ssubscribe(channel)
        return False

    async def wait_for_wakeup(self, timeout_s: float) -> bool:
        if self.flag is not None:
            return await async_wait_flag(self.flag, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            message = await self.pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=remaining
            )
            if message is not None and as_bytes(message["data"]) == as_bytes(self.token):
                return True

    async def close(self) -> None:
        if self.flag is not None and self.wakeups is not None:
            self.flag = None
            await self.wakeups.unregister(self.channel, self.token)
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
        read_from_replicas: bool = False,
    ) -> None:
        self._core = LimiterCore(slot_timeout, fail_open, key_prefix)
        use_cluster = cluster if cluster is not None else cluster_from_env()
        if read_from_replicas:
            check_read_from_replicas(client, use_cluster)
        if client is None:
            url = redis_url or _core.redis_url_from_env(os.environ)
            options = client_options(socket_timeout, redis.asyncio.retry.Retry)
            if use_cluster:
                options.update(replica_read_options(read_from_replicas))
                client = redis.asyncio.cluster.RedisCluster.from_url(url, **options)
            else:
                client = redis.asyncio.Redis.from_url(url, **options)
        self.client = client
        self._is_cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._wakeups = None if self._is_cluster else AsyncWakeups(client, socket_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None

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
        _core.check_wait(wait)

        def decorate(func: F) -> F:
            _core.check_limited_function(key_template, func, is_async=True)

            @functools.wraps(func)
            async def limited(*args: Any, **kwargs: Any) -> Any:
                key = _core.format_key(key_template, func, args, kwargs)
                async with self.slot(key, max_slots, wait=wait, renew=renew):
                    return await func(*args, **kwargs)

            return limited  # type: ignore[return-value]

        return decorate

    async def close(self) -> None:
        """Close the Redis client's connections."""
        if self._wakeups is not None:
            await self._wakeups.close()
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
        self._check_loop()
        session = _Session(stop, self._wakeups)
        cancels_before = _cancel_requests()
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
                    if _cancel_requests() > cancels_before and not session.aborting:
                        session.aborting = True
                        error = asyncio.CancelledError()
                    else:
                        error = exc
                else:
                    # redis.asyncio can also finish a call normally and drop a
                    # cancel that came meanwhile, because asyncio.wait_for before
                    # Python 3.12 returns a result that is ready.
                    if _cancel_requests() > cancels_before and not session.aborting:
                        session.aborting = True
                        error = asyncio.CancelledError()
        finally:
            # Awaited only when there is something to close, because a cancel
            # that came during the await would drop the operation's result.
            if session.subscribed:
                await asyncio.shield(session.close())

    def _check_loop(self) -> None:
        """Bind the limiter to the running loop, or raise if it belongs to another."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise ConcurrentRunsError(
                "Could not use this AsyncConcurrentRunsLimiter: it belongs to another "
                "event loop, and its Redis client cannot move; create one limiter per "
                "event loop (get_async_concurrent_limiter() does)"
            )

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
        if self._is_cluster and isinstance(request, LoadLibrary):
            return await self._load_on_every_primary(request.source)
        if self._is_cluster and isinstance(request, FunctionCall) and not request.keys:
            return await self._read_version_of_every_primary(request)
        if isinstance(request, FunctionCall):
            call = self.client.fcall_ro if request.read_only else self.client.fcall
            return await call(request.name, len(request.keys), *request.keys, *request.args)
        if isinstance(request, LoadLibrary):
            return await self.client.function_load(request.source)
        if isinstance(request, Subscribe):
            return await session.subscribe(self.client, request.channel, request.token)
        if isinstance(request, Unsubscribe):
            await session.close()
            return None
        if isinstance(request, WaitForMessage):
            return await session.wait_for_wakeup(request.timeout_s)
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

    async def _load_on_every_primary(self, source: str) -> Any:
        """Load the library on each primary that lacks it, one node at a time."""
        return merge_cluster_loads(await self._on_every_primary("FUNCTION LOAD", source))

    async def _read_version_of_every_primary(self, request: FunctionCall) -> Any:
        """Run the keyless runs_version on each primary and merge the replies."""
        command = "FCALL_RO" if request.read_only else "FCALL"
        replies = await self._on_every_primary(command, request.name, 0, *request.args)
        return merge_cluster_versions(replies)

    async def _on_every_primary(self, *command: Any) -> list[Any]:
        """Run a command on each primary; return its replies and error replies."""
        # The cluster client learns its nodes on its first command.
        await self.client.initialize()
        replies: list[Any] = []
        for node in self.client.get_primaries():
            try:
                replies.append(
                    await self.client.execute_command(*command, target_nodes=node)
                )
            except ResponseError as exc:
                replies.append(exc)
        return replies


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
        self._in_use = False

    async def __aenter__(self) -> str:
        if self._in_use:
            raise self.in_use_error()
        self._in_use = True
        try:
            token = await self._limiter.acquire(self.key, self.max_slots, wait=self.wait)
        except BaseException:
            self._in_use = False
            raise
        if token is None:
            self._in_use = False
            raise SlotLimitReachedError(self.key, self.max_slots, self.wait)
        self.begin(token)
        if self.renew:
            self._stop = asyncio.Event()
            renewal = self._limiter._core.keep_renewed(self.key, token, self)
            self._renewer = asyncio.ensure_future(self._limiter._run(renewal, self._stop))
        return token

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Shielded and awaited to its end, so that a task cancelled inside the
        # block, even again and again, gives its slot back before the
        # cancellation goes on.
        giving_back = asyncio.ensure_future(self._give_back())
        cancelled = False
        while not giving_back.done():
            try:
                await asyncio.shield(giving_back)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        giving_back.result()

    async def _give_back(self) -> None:
        try:
            self._stop.set()
            if self._renewer is not None:
                await self._renewer
                self._renewer = None
            if self.token is not None:
                try:
                    await self._limiter.release(self.key, self.token)
                except LimiterUnavailableError as error:
                    self.log_release_failure(error)
        finally:
            self.token = None
            self._in_use = False


# One limiter per event loop, because a redis.asyncio client belongs to the
# loop it first ran on. The key None holds a limiter made outside any loop.
_shared_limiters: weakref.WeakKeyDictionary[Any, AsyncConcurrentRunsLimiter] = (
    weakref.WeakKeyDictionary()
)
_unbound_limiter: AsyncConcurrentRunsLimiter | None = None


def get_async_concurrent_limiter() -> AsyncConcurrentRunsLimiter:
    """Return the asyncio limiter of the running event loop, built once per
    loop from the environment (see get_concurrent_limiter).

    Called outside any event loop, it returns one limiter that belongs to the
    first loop it runs on.
    """
    global _unbound_limiter
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        if _unbound_limiter is None:
            _unbound_limiter = AsyncConcurrentRunsLimiter(
                **_core.limiter_settings_from_env(os.environ)
            )
        return _unbound_limiter
    limiter = _shared_limiters.get(loop)
    if limiter is None:
        limiter = AsyncConcurrentRunsLimiter(**_core.limiter_settings_from_env(os.environ))
        _shared_limiters[loop] = limiter
    return limiter


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
