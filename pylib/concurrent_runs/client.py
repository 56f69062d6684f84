"""The blocking limiter, on redis-py's sync client."""

from __future__ import annotations

import functools
import os
import threading
import time
from types import TracebackType
from typing import Any, Callable, TypeVar

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, ResponseError
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
    Unsubscribe,
    WaitForMessage,
)
from ._wakeups import Wakeups, as_bytes, wait_flag
from .errors import ConcurrentRunsError, LimiterUnavailableError, SlotLimitReachedError
from .library import packaged_version, parse_version

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def client_options(socket_timeout: float, retry_class: type = Retry) -> dict[str, Any]:
    """Return redis-py client settings that bound how long any call can hang.

    redis-py's default retries ten times. The limiter retries a failed call
    once itself, with the same arguments, so redis-py's own retries are off,
    and a call that meets a dead server returns within about twice the socket
    timeout.
    """
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": retry_class(NoBackoff(), 0),
    }


def cluster_from_env() -> bool:
    return os.environ.get("CONCURRENT_RUNS_CLUSTER", "").strip().lower() in _core.TRUE_WORDS


def replica_read_options(read_from_replicas: bool) -> dict[str, Any]:
    """Return RedisCluster settings that send read-only commands to replicas.

    redis-py routes FCALL_RO by its key and, with a load balancing strategy
    set, to a replica of the key's shard. A shard without replicas serves the
    read from its primary.
    """
    if not read_from_replicas:
        return {}
    try:
        from redis.cluster import LoadBalancingStrategy
    except ImportError:
        # NOTE: redis-py before 5.1 has no LoadBalancingStrategy; its
        # read_from_replicas flag spreads reads over the primary and replicas.
        return {"read_from_replicas": True}
    return {"load_balancing_strategy": LoadBalancingStrategy.ROUND_ROBIN_REPLICAS}


def check_read_from_replicas(client: Any, cluster: bool) -> None:
    """Raise ValueError where read_from_replicas cannot take effect."""
    if client is not None:
        raise ValueError(
            "read_from_replicas applies only to a client the limiter builds; "
            "set load_balancing_strategy on the RedisCluster you pass instead"
        )
    if not cluster:
        raise ValueError("read_from_replicas needs a Redis Cluster: pass cluster=True")


def merge_cluster_loads(replies: list[Any]) -> Any:
    """Return the reply that represents FUNCTION LOAD on every primary.

    ``replies`` holds each primary's reply or error reply. A primary that
    already had the library replies "already exists", which is raised only
    when every primary had it; any other error is raised at once.
    """
    loaded = None
    already_exists = None
    for reply in replies:
        if not isinstance(reply, ResponseError):
            loaded = reply
        elif "already exists" in str(reply):
            already_exists = reply
        else:
            raise reply
    if loaded is None and already_exists is not None:
        raise already_exists
    return loaded


def merge_cluster_versions(replies: list[Any]) -> Any:
    """Return the library version that represents every primary of a cluster.

    ``replies`` holds each primary's reply or error reply. Each primary has
    its own copy of the library. An unreadable version, or one of another
    major version than the packaged library, is returned first so that the
    version check fails. Otherwise the error of a primary without the library
    is raised so that the library gets loaded. Else the lowest version is
    returned.
    """
    versions = [reply for reply in replies if not isinstance(reply, ResponseError)]
    missing = None
    for reply in replies:
        if isinstance(reply, ResponseError):
            if not _core.is_function_missing(reply):
                raise reply
            missing = reply
    packaged_major = parse_version(packaged_version())[0]

    def rank(reply: Any) -> tuple:
        try:
            version = parse_version(_core.as_text(reply))
        except ValueError:
            return (0,)
        return (1 if version[0] != packaged_major else 2, version)

    worst = min(versions, key=rank, default=None)
    if worst is not None and rank(worst)[0] < 2:
        return worst
    if missing is not None:
        raise missing
    return worst


class _Session:
    """The I/O state of one running operation: its subscription and stop flag.

    A waiter on a single server registers with the limiter's shared
    subscription (``wakeups``); on a cluster it subscribes on its own
    (``pubsub``) and reads the messages for its ``token``.
    """

    def __init__(self, stop: threading.Event | None, wakeups: Wakeups | None) -> None:
        self.stop = stop
        self.wakeups = wakeups
        self.channel: KeyT | None = None
        self.token: KeyT | None = None
        self.flag: threading.Event | None = None
        self.pubsub: Any = None

    def subscribe(self, client: Any, channel: KeyT, token: KeyT) -> bool:
        self.channel, self.token = channel, token
        if self.wakeups is not None:
            self.flag, already_active = self.wakeups.register(channel, token)
            return already_active
        self.pubsub = client.pubsub()
        self.pubsub.ssubscribe(channel)
        return False

    def wait_for_wakeup(self, timeout_s: float) -> bool:
        if self.flag is not None:
            return wait_flag(self.flag, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            message = self.pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=remaining
            )
            if message is not None and as_bytes(message["data"]) == as_bytes(self.token):
                return True

    def close(self) -> None:
        if self.flag is not None and self.wakeups is not None:
            self.flag = None
            self.wakeups.unregister(self.channel, self.token)
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
    CONCURRENT_RUNS_CLUSTER. With ``read_from_replicas`` that cluster client
    sends get_count and get_holders to replicas, which may lag behind their
    primary by the replication delay.
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
        read_from_replicas: bool = False,
    ) -> None:
        self._core = LimiterCore(slot_timeout, fail_open, key_prefix)
        use_cluster = cluster if cluster is not None else cluster_from_env()
        if read_from_replicas:
            check_read_from_replicas(client, use_cluster)
        if client is None:
            url = redis_url or _core.redis_url_from_env(os.environ)
            options = client_options(socket_timeout)
            if use_cluster:
                options.update(replica_read_options(read_from_replicas))
                # redis-py's cluster client reads the cluster's layout at once.
                try:
                    client = redis.cluster.RedisCluster.from_url(url, **options)
                except RedisClusterException as exc:
                    raise ConcurrentRunsError(
                        f"Could not connect to the Redis Cluster: {exc}"
                    ) from exc
                except _core.CONNECTION_ERRORS as exc:
                    raise LimiterUnavailableError(
                        f"Could not connect to the Redis Cluster: {exc}"
                    ) from exc
            else:
                client = redis.Redis.from_url(url, **options)
        self.client = client
        self._is_cluster = isinstance(client, redis.cluster.RedisCluster)
        self._wakeups = None if self._is_cluster else Wakeups(client, socket_timeout)

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
        _core.check_wait(wait)

        def decorate(func: F) -> F:
            _core.check_limited_function(key_template, func, is_async=False)

            @functools.wraps(func)
            def limited(*args: Any, **kwargs: Any) -> Any:
                key = _core.format_key(key_template, func, args, kwargs)
                with self.slot(key, max_slots, wait=wait, renew=renew):
                    return func(*args, **kwargs)

            return limited  # type: ignore[return-value]

        return decorate

    def close(self) -> None:
        """Close the Redis client's connections."""
        if self._wakeups is not None:
            self._wakeups.close()
        self.client.close()

    def __enter__(self) -> ConcurrentRunsLimiter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # I/O -----------------------------------------------------------------------

    def _run(self, operation: Operation[T], stop: threading.Event | None = None) -> T:
        """Drive an operation: perform each request it yields, send back the result."""
        session = _Session(stop, self._wakeups)
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
        if self._is_cluster and isinstance(request, LoadLibrary):
            return self._load_on_every_primary(request.source)
        if self._is_cluster and isinstance(request, FunctionCall) and not request.keys:
            return self._read_version_of_every_primary(request)
        if isinstance(request, FunctionCall):
            call = self.client.fcall_ro if request.read_only else self.client.fcall
            return call(request.name, len(request.keys), *request.keys, *request.args)
        if isinstance(request, LoadLibrary):
            return self.client.function_load(request.source)
        if isinstance(request, Subscribe):
            return session.subscribe(self.client, request.channel, request.token)
        if isinstance(request, Unsubscribe):
            session.close()
            return None
        if isinstance(request, WaitForMessage):
            return session.wait_for_wakeup(request.timeout_s)
        if isinstance(request, Sleep):
            if session.stop is None:
                time.sleep(request.seconds)
                return False
            return session.stop.wait(request.seconds)
        if isinstance(request, AwaitResult):
            raise TypeError("on_lost returned an awaitable; the sync limiter cannot await it")
        raise TypeError(f"unknown request {request!r}")

    def _load_on_every_primary(self, source: str) -> Any:
        """Load the library on each primary of the cluster that lacks it.

        redis-py's own FUNCTION LOAD goes to every primary but stops at the
        first error, so a primary that has the library would keep it from the
        primaries after it. Hence the load goes to one node at a time.
        """
        return merge_cluster_loads(self._on_every_primary("FUNCTION LOAD", source))

    def _read_version_of_every_primary(self, request: FunctionCall) -> Any:
        """Run the keyless runs_version on each primary and merge the replies."""
        command = "FCALL_RO" if request.read_only else "FCALL"
        replies = self._on_every_primary(command, request.name, 0, *request.args)
        return merge_cluster_versions(replies)

    def _on_every_primary(self, *command: Any) -> list[Any]:
        """Run a command on each primary; return its replies and error replies."""
        replies: list[Any] = []
        for node in self.client.get_primaries():
            try:
                replies.append(self.client.execute_command(*command, target_nodes=node))
            except ResponseError as exc:
                replies.append(exc)
        return replies


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
        self._in_use = threading.Lock()

    def __enter__(self) -> str:
        if not self._in_use.acquire(blocking=False):
            raise self.in_use_error()
        try:
            token = self._limiter.acquire(self.key, self.max_slots, wait=self.wait)
        except BaseException:
            self._in_use.release()
            raise
        if token is None:
            self._in_use.release()
            raise SlotLimitReachedError(self.key, self.max_slots, self.wait)
        try:
            self.begin(token)
            if self.renew:
                self._stop = threading.Event()
                renewal = self._limiter._core.keep_renewed(self.key, token, self)
                self._renewer = threading.Thread(
                    target=self._limiter._run,
                    args=(renewal, self._stop),
                    name=f"concurrent_runs renewal of {self.key!r}",
                    daemon=True,
                )
                self._renewer.start()
        except BaseException:
            # Interrupted before the block began: give the slot back now.
            self._give_back()
            raise
        return token

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._give_back()

    def _give_back(self) -> None:
        try:
            self._stop.set()
            if self._renewer is not None:
                self._renewer.join()
                self._renewer = None
            if self.token is not None:
                try:
                    self._limiter.release(self.key, self.token)
                except LimiterUnavailableError as error:
                    self.log_release_failure(error)
        finally:
            self.token = None
            self._in_use.release()


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
