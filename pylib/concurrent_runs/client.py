"""The blocking limiter, on redis-py's sync client."""

from __future__ import annotations

import functools
import os
import threading
import time
from types import TracebackType
from typing import Any, Callable, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

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
from .errors import LimiterUnavailableError, SlotLimitReachedError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def client_options(socket_timeout: float, retry_class: type = Retry) -> dict[str, Any]:
    """Return redis-py client settings that bound how long any call can hang.

    redis-py's default retries ten times; two tries at most keep a call that
    meets a dead server within about twice the socket timeout.
    """
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": retry_class(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 1),
    }


def cluster_from_env() -> bool:
    return os.environ.get("CONCURRENT_RUNS_CLUSTER", "").strip().lower() in _core.TRUE_WORDS


class _Session:
    """The I/O state of one running operation: its subscription and stop flag."""

    def __init__(self, stop: threading.Event | None) -> None:
        self.stop = stop
        self.pubsub: Any = None

    def close(self) -> None:
        if self.pubsub is not None:
            self.pubsub.close()
            self.pubsub = None


class ConcurrentRunsLimiter:
    """At most N concurrent runs of a key, across every process sharing a Redis.

    ``redis_url`` defaults to CONCURRENT_RUNS_REDIS_URL, then REDIS_URL, then
    redis://localhost:6379/0; ``client`` takes a ready redis-py client instead.
    ``slot_timeout`` is the lease length in seconds: a slot whose holder stops
    extending it frees itself that long after the last acquire or extend.
    With ``fail_open`` on, an unreachable Redis grants slots instead of raising.
    ``socket_timeout`` (seconds) bounds each Redis call of a client built here.
    ``cluster`` builds a Redis Cluster client; it defaults to
    CONCURRENT_RUNS_CLUSTER.
    """

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
            options = client_options(socket_timeout)
            if cluster if cluster is not None else cluster_from_env():
                client = redis.cluster.RedisCluster.from_url(url, **options)
            else:
                client = redis.Redis.from_url(url, **options)
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

    def acquire(self, key: KeyT, max_slots: int, wait: float | None = None) -> str | None:
        """Take a slot of ``key``; return its token, or None when none is free.

        With ``wait`` (seconds), wait in line up to that long for a slot.
        """
        return self._run(self._core.acquire(key, max_slots, wait))

    def release(self, key: KeyT, token: KeyT) -> bool:
        """Free the slot; return False when ``token`` held no live slot."""
        return self._run(self._core.release(key, token))

    def extend(self, key: KeyT, token: KeyT, timeout: float | None = None) -> bool:
        """Make the lease end ``timeout`` seconds (default slot_timeout) from now.

        Return False when ``token`` held no live slot: an ended lease is never
        revived.
        """
        return self._run(self._core.extend(key, token, timeout))

    def get_count(self, key: KeyT) -> int:
        """Return the number of live slots of ``key``."""
        return self._run(self._core.get_count(key))

    def get_holders(self, key: KeyT) -> dict[str, float]:
        """Return the live slots of ``key``: token to seconds left, soonest first."""
        return self._run(self._core.get_holders(key))

    def slot(
        self,
        key: KeyT,
        max_slots: int,
        *,
        wait: float | None = None,
        renew: bool = False,
        on_lost: LostCallback | None = None,
    ) -> Slot:
        """Return a context manager that holds a slot while its block runs.

        Entering it returns the token, or raises SlotLimitReachedError when no
        slot came free. With ``renew`` a background thread extends the lease
        every third of slot_timeout; ``on_lost(key, token)`` is called if the
        lease is found gone.
        """
        return Slot(self, key, max_slots, wait=wait, renew=renew, on_lost=on_lost)

    def limit(
        self,
        key_template: str,
        max_slots: int,
        *,
        wait: float | None = None,
        renew: bool = False,
    ) -> Callable[[F], F]:
        """Decorate a function so that each call holds a slot while it runs.

        The key is ``key_template`` formatted with the call's arguments by
        name, such as ``"agent:{agent_id}"``.
        """
        _core.check_max_slots(max_slots)

        def decorate(func: F) -> F:
            @functools.wraps(func)
            def limited(*args: Any, **kwargs: Any) -> Any:
                key = _core.format_key(key_template, func, args, kwargs)
                with self.slot(key, max_slots, wait=wait, renew=renew):
                    return func(*args, **kwargs)

            return limited  # type: ignore[return-value]

        return decorate

    def close(self) -> None:
        """Close the Redis client's connections."""
        self.client.close()

    def __enter__(self) -> ConcurrentRunsLimiter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # I/O -----------------------------------------------------------------------

    def _run(self, operation: Operation[T], stop: threading.Event | None = None) -> T:
        """Drive an operation: perform each request it yields, send back the result."""
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
                    reply = self._perform(request, session)
                except BaseException as exc:
                    error = exc
        finally:
            session.close()

    def _perform(self, request: Request, session: _Session) -> Any:
        if isinstance(request, FunctionCall):
            call = self.client.fcall_ro if request.read_only else self.client.fcall
            return call(request.name, len(request.keys), *request.keys, *request.args)
        if isinstance(request, LoadLibrary):
            return self.client.function_load(request.source)
        if isinstance(request, Subscribe):
            session.pubsub = self.client.pubsub()
            session.pubsub.ssubscribe(request.channel)
            return None
        if isinstance(request, WaitForMessage):
            return self._wait_for_message(session.pubsub, request.timeout_s)
        if isinstance(request, Sleep):
            if session.stop is None:
                time.sleep(request.seconds)
                return False
            return session.stop.wait(request.seconds)
        if isinstance(request, AwaitResult):
            raise TypeError("on_lost returned an awaitable; the sync limiter cannot await it")
        raise TypeError(f"unknown request {request!r}")

    @staticmethod
    def _wait_for_message(pubsub: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            message = pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=remaining
            )
            if message is not None:
                return True


class Slot(SlotState):
    """A slot held for the length of a ``with`` block; see ConcurrentRunsLimiter.slot."""

    def __init__(
        self,
        limiter: ConcurrentRunsLimiter,
        key: KeyT,
        max_slots: int,
        *,
        wait: float | None = None,
        renew: bool = False,
        on_lost: LostCallback | None = None,
    ) -> None:
        super().__init__(key, max_slots, wait, renew, on_lost)
        self._limiter = limiter
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> str:
        token = self._limiter.acquire(self.key, self.max_slots, wait=self.wait)
        if token is None:
            raise SlotLimitReachedError(self.key, self.max_slots, self.wait)
        self.token = token
        if self.renew:
            renewal = self._limiter._core.keep_renewed(self.key, token, self)
            self._renewer = threading.Thread(
                target=self._limiter._run,
                args=(renewal, self._stop),
                name=f"concurrent_runs renewal of {self.key!r}",
                daemon=True,
            )
            self._renewer.start()
        return token

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.token is None:
            return
        try:
            self._limiter.release(self.key, self.token)
        except LimiterUnavailableError as error:
            _core.logger.warning(
                "could not release slot %s of %r; it frees itself when its lease "
                "ends: %s",
                self.token,
                self.key,
                error,
            )


_shared_limiter: ConcurrentRunsLimiter | None = None
_shared_lock = threading.Lock()


def get_concurrent_limiter() -> ConcurrentRunsLimiter:
    """Return the process-wide limiter, built once from the environment.

    It reads CONCURRENT_RUNS_REDIS_URL (or REDIS_URL), CONCURRENT_RUNS_SLOT_TIMEOUT
    and CONCURRENT_RUNS_FAIL_OPEN.
    """
    global _shared_limiter
    with _shared_lock:
        if _shared_limiter is None:
            _shared_limiter = ConcurrentRunsLimiter(
                **_core.limiter_settings_from_env(os.environ)
            )
        return _shared_limiter


def acquire_slot(
    key: KeyT,
    max_slots: int,
    *,
    wait: float | None = None,
    renew: bool = False,
    on_lost: LostCallback | None = None,
) -> Slot:
    """Hold a slot of the process-wide limiter: ``with acquire_slot(k, 3): ...``."""
    return get_concurrent_limiter().slot(
        key, max_slots, wait=wait, renew=renew, on_lost=on_lost
    )
