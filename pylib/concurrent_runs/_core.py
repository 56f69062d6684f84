"""Everything the sync and asyncio limiters share: all but the I/O.

Each operation is a generator that yields requests (call a function, load the
library, subscribe, wait for a message, sleep) and receives their replies. The
sync limiter performs requests with blocking calls, the asyncio limiter awaits
them, and both feed the outcome back, or throw the exception raised, into the
generator. So argument checks, retries, version checks, waiting in line and
lease renewal are written once.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import re
import secrets
import string
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generator, Mapping, TypeVar, Union

from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoPermissionError,
    OutOfMemoryError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import (
    ConcurrentRunsError,
    InvalidArgumentError,
    LibraryError,
    LibraryLoadError,
    LibraryVersionError,
    LimiterUnavailableError,
)
from .library import (
    FN_ACQUIRE,
    FN_COUNT,
    FN_EXTEND,
    FN_HOLDERS,
    FN_RELEASE,
    FN_VERSION,
    FN_WAIT,
    LIBRARY_NAME,
    library_source,
    packaged_version,
    parse_version,
)

logger = logging.getLogger("concurrent_runs")

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_KEY_PREFIX = "concurrent_runs:"
DEFAULT_SLOT_TIMEOUT_S = 300.0
DEFAULT_SOCKET_TIMEOUT_S = 5.0

MAX_SLOTS_LIMIT = 2**31 - 1
MAX_TIMEOUT_MS = 2**40
MAX_TOKEN_BYTES = 256
TOKEN_BYTES = 16  # 128 random bits

# A waiter's place in line lasts this long unless it calls again; the
# fallback poll below renews it well before it ends.
WAIT_LEASE_MS = 3000
FALLBACK_POLL_S = 1.0
# Renewal extends the lease when this fraction of slot_timeout has passed.
RENEW_FRACTION = 1 / 3
# Tokens kept for release after calls that failed on an unreachable Redis.
# Past this many the oldest are dropped, and their slots end with their leases.
MAX_UNCONFIRMED = 100
# Loads of the library one call may make when it keeps vanishing from the
# server (FUNCTION FLUSH run again and again) before the call gives up.
MAX_LIBRARY_LOADS = 5

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError)
# A generator of its own, so that the jitter of waiters leaves the global
# random state of the application alone.
_jitter = random.Random()
TRUE_WORDS = frozenset({"1", "true", "yes"})

KeyT = Union[str, bytes]
T = TypeVar("T")
Operation = Generator["Request", Any, T]
LostCallback = Callable[[KeyT, str], Any]


# Requests that operations yield to the I/O layer ---------------------------


@dataclass(frozen=True)
class FunctionCall:
    """FCALL (or FCALL_RO) of one library function; replies with its result."""

    name: str
    keys: tuple[KeyT, ...]
    args: tuple[KeyT | int, ...]
    read_only: bool = False


@dataclass(frozen=True)
class LoadLibrary:
    """FUNCTION LOAD of the packaged source; replies with the library name."""

    source: str


@dataclass(frozen=True)
class Subscribe:
    """Wait for wake-ups of ``token`` on a sharded channel until the operation ends.

    Replies True when the subscription was already active, False when it has
    just been made (a message sent before it may have been missed).
    """

    channel: KeyT
    token: KeyT


@dataclass(frozen=True)
class Unsubscribe:
    """End the subscription of the operation; replies None."""


@dataclass(frozen=True)
class WaitForMessage:
    """Wait for a wake-up of the subscribed token; replies True, or False on timeout."""

    timeout_s: float


@dataclass(frozen=True)
class Sleep:
    """Pause; replies True when the caller asked the operation to stop."""

    seconds: float


@dataclass(frozen=True)
class AwaitResult:
    """Await a value that a user callback returned (asyncio only)."""

    awaitable: Any


Request = Union[
    FunctionCall, LoadLibrary, Subscribe, Unsubscribe, WaitForMessage, Sleep, AwaitResult
]


# Argument checks -------------------------------------------------------------


def check_key(key: object) -> KeyT:
    if not isinstance(key, (str, bytes)):
        raise TypeError(f"key must be str or bytes, not {type(key).__name__}")
    if len(key) == 0:
        raise ValueError("key must not be empty")
    if isinstance(key, str):
        encoded_text(key, "key")
    return key


def check_max_slots(max_slots: object) -> int:
    if isinstance(max_slots, bool) or not isinstance(max_slots, int):
        raise TypeError(f"max_slots must be an int, not {type(max_slots).__name__}")
    if not 1 <= max_slots <= MAX_SLOTS_LIMIT:
        raise ValueError(f"max_slots must be from 1 to {MAX_SLOTS_LIMIT}, got {max_slots}")
    return max_slots


def check_token(token: object) -> KeyT:
    if not isinstance(token, (str, bytes)):
        raise TypeError(f"token must be str or bytes, not {type(token).__name__}")
    encoded = encoded_text(token, "token") if isinstance(token, str) else token
    if not 1 <= len(encoded) <= MAX_TOKEN_BYTES:
        raise ValueError(f"token must be 1 to {MAX_TOKEN_BYTES} bytes, got {len(encoded)}")
    if encoded[0] == 0:
        raise ValueError("token must not start with a NUL byte (reserved for waiters)")
    return token


def encoded_text(text: str, name: str) -> bytes:
    """Return text as the UTF-8 bytes redis-py sends, or raise ValueError."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} must be encodable as UTF-8: {exc}") from None


def seconds_to_ms(seconds: object, name: str) -> int:
    """Convert a duration in seconds to whole ms (rounded up), checking it."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(seconds).__name__}")
    # Ints are checked without float conversion, which overflows past 1e308.
    if not seconds > 0 or (isinstance(seconds, float) and not math.isfinite(seconds)):
        raise ValueError(f"{name} must be a positive number of seconds, got {seconds!r}")
    scaled = seconds * 1000
    if scaled > MAX_TIMEOUT_MS:
        raise ValueError(f"{name} must be at most {MAX_TIMEOUT_MS / 1000:.3f} s, got {seconds!r}")
    return max(1, math.ceil(scaled))


def check_wait(wait: object) -> float | None:
    if wait is None:
        return None
    if isinstance(wait, bool) or not isinstance(wait, (int, float)):
        raise TypeError(f"wait must be a number of seconds or None, not {type(wait).__name__}")
    try:
        wait_s = float(wait)
    except OverflowError:
        wait_s = math.inf
    if not (wait_s >= 0 and math.isfinite(wait_s)):
        raise ValueError(
            f"wait must be zero or a finite positive number of seconds, got {wait!r}"
        )
    return wait_s


def new_token() -> str:
    """Return a fresh unguessable token: 128 random bits as 32 hex digits."""
    return secrets.token_hex(TOKEN_BYTES)


def as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# Settings from the environment ---------------------------------------------


def redis_url_from_env(environ: Mapping[str, str]) -> str:
    """Return CONCURRENT_RUNS_REDIS_URL, else REDIS_URL, else the local default."""
    return (
        environ.get("CONCURRENT_RUNS_REDIS_URL")
        or environ.get("REDIS_URL")
        or DEFAULT_REDIS_URL
    )


def limiter_settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return constructor arguments read from the CONCURRENT_RUNS_* variables."""
    settings: dict[str, Any] = {"redis_url": redis_url_from_env(environ)}
    timeout_text = environ.get("CONCURRENT_RUNS_SLOT_TIMEOUT")
    if timeout_text:
        try:
            settings["slot_timeout"] = float(timeout_text)
            seconds_to_ms(settings["slot_timeout"], "slot_timeout")
        except ValueError:
            raise ValueError(
                "CONCURRENT_RUNS_SLOT_TIMEOUT must be a positive number of seconds, "
                f"got {timeout_text!r}"
            ) from None
    fail_open_text = environ.get("CONCURRENT_RUNS_FAIL_OPEN", "")
    settings["fail_open"] = fail_open_text.strip().lower() in TRUE_WORDS
    return settings


def key_template_fields(template: str, func: Callable[..., Any]) -> list[str]:
    """Return the argument names a key template uses, checking them against func.

    Raise ValueError for a positional field such as '{0}' and for a name that
    is not a parameter of func (unless func takes **kwargs).
    """
    parameters = inspect.signature(func).parameters
    takes_any_keyword = any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()
    )
    fields = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        name = re.split(r"[.\[]", field, maxsplit=1)[0]
        if not name or name.isdigit():
            raise ValueError(
                f"key template {template!r} has a positional field {{{field}}}; name "
                f"an argument of {func.__qualname__} instead, such as {{agent_id}}"
            )
        if name not in parameters and not takes_any_keyword:
            raise ValueError(
                f"key template {template!r} names {name!r}, which is not an argument "
                f"of {func.__qualname__}"
            )
        fields.append(name)
    return fields


def check_limited_function(template: str, func: Callable[..., Any], is_async: bool) -> None:
    """Check a function for the limit decorator before it is wrapped.

    A coroutine function under the sync decorator would hold its slot only
    while the coroutine object is made, so it is rejected, as is a plain
    function under the asyncio decorator.
    """
    if not callable(func):
        raise TypeError(f"limit() decorates a function, not {type(func).__name__}")
    if inspect.iscoroutinefunction(func) and not is_async:
        raise TypeError(
            f"{func.__qualname__} is a coroutine function: decorate it with "
            "AsyncConcurrentRunsLimiter.limit"
        )
    if is_async and not inspect.iscoroutinefunction(func):
        raise TypeError(
            f"{func.__qualname__} is not a coroutine function: decorate it with "
            "ConcurrentRunsLimiter.limit"
        )
    key_template_fields(template, func)


def format_key(template: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> str:
    """Fill a key template such as 'agent:{agent_id}' from a call's arguments.

    Arguments passed through **kwargs can be named too.
    """
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    for parameter in bound.signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            values.update(values.pop(parameter.name, {}))
    try:
        return template.format(**values)
    except KeyError as exc:
        raise ValueError(
            f"key template {template!r} names {exc}, which this call of "
            f"{func.__qualname__} did not pass"
        ) from None


# Replies and errors ------------------------------------------------------------


def is_function_missing(exc: ResponseError) -> bool:
    return "function not found" in str(exc).lower()


def translate_response_error(exc: ResponseError, call: FunctionCall) -> ConcurrentRunsError:
    """Map an error reply from Redis to the matching package error."""
    message = str(exc)
    if message.startswith("invalid ") or message.startswith("wrong number of"):
        return InvalidArgumentError(f"Redis rejected {call.name}: {message}")
    if message.startswith("WRONGTYPE"):
        return ConcurrentRunsError(
            f"Could not run {call.name} on key {call.keys[0]!r}: the key holds "
            "another type of value, not a concurrent_runs sorted set"
        )
    if isinstance(exc, OutOfMemoryError):
        return ConcurrentRunsError(
            f"Could not run {call.name}: Redis is out of memory (used memory is above "
            "maxmemory and the policy evicts nothing). Releases, extends and reaps "
            "still work; free memory or raise maxmemory to take new slots"
        )
    if is_function_missing(exc):
        return LibraryError(
            f"Could not run {call.name}: the server's {LIBRARY_NAME} library has no "
            f"such function; run `concurrent-runs load` to upgrade it to "
            f"{packaged_version()}"
        )
    return ConcurrentRunsError(f"Could not run {call.name}: Redis replied {message!r}")


def login_error(action: str, exc: AuthenticationError) -> ConcurrentRunsError:
    """Return the error for a login that Redis rejected.

    A rejected login is a configuration mistake, not an outage, so it is no
    LimiterUnavailableError and fail_open never grants slots through it.
    """
    return ConcurrentRunsError(
        f"Could not {action}: Redis rejected the login ({exc}); check the user "
        "name and password in the Redis URL or client"
    )


def cluster_error(action: str, exc: Exception) -> ConcurrentRunsError:
    """Return the error for a Redis Cluster client that could not work at all,
    such as one pointed at a server that is not in cluster mode."""
    return ConcurrentRunsError(f"Could not {action} on the Redis Cluster: {exc}")


def check_compatible(installed: str, packaged: str) -> None:
    """Raise LibraryVersionError unless both versions share a major version."""
    try:
        installed_major = parse_version(installed)[0]
    except ValueError:
        installed_major = -1
    packaged_major = parse_version(packaged)[0]
    if installed_major == packaged_major:
        return
    if installed_major < packaged_major:
        remedy = "run `concurrent-runs load --force` to replace it"
    else:
        remedy = (
            "upgrade the concurrent-runs package, or run `concurrent-runs load "
            "--force` to downgrade the server"
        )
    raise LibraryVersionError(
        installed,
        packaged,
        f"Could not use the {LIBRARY_NAME} library on the server: it is version "
        f"{installed}, but this package has {packaged} and needs major version "
        f"{packaged_major}; {remedy}",
    )


# The shared limiter logic --------------------------------------------------


class LimiterCore:
    """Settings and operations shared by the sync and asyncio limiters."""

    def __init__(
        self,
        slot_timeout: float,
        fail_open: bool,
        key_prefix: KeyT,
    ) -> None:
        self.slot_timeout_ms = seconds_to_ms(slot_timeout, "slot_timeout")
        self.slot_timeout = self.slot_timeout_ms / 1000
        if not isinstance(key_prefix, (str, bytes)):
            raise TypeError(f"key_prefix must be str or bytes, not {type(key_prefix).__name__}")
        self.fail_open = bool(fail_open)
        self.key_prefix = key_prefix
        self.server_version: str | None = None
        # (redis_key, token) of calls whose outcome on the server is unknown.
        self.unconfirmed: deque[tuple[KeyT, KeyT]] = deque(maxlen=MAX_UNCONFIRMED)

    def redis_key(self, key: object) -> KeyT:
        """Return the Redis key of a logical key: key_prefix + key."""
        checked = check_key(key)
        prefix = self.key_prefix
        if isinstance(prefix, bytes) or isinstance(checked, bytes):
            prefix_bytes = prefix.encode() if isinstance(prefix, str) else prefix
            key_bytes = checked.encode() if isinstance(checked, str) else checked
            return prefix_bytes + key_bytes
        return prefix + checked

    def timeout_ms(self, timeout: float | None) -> int:
        if timeout is None:
            return self.slot_timeout_ms
        return seconds_to_ms(timeout, "timeout")

    # Calls, with the library check and retries ----------------------------

    def call_function(self, call: FunctionCall) -> Operation[Any]:
        """Run one library function: check the library once, retry once.

        The retry after a connection error repeats the same arguments, token
        included, so an acquire that ran but lost its reply takes no second
        slot. A server that has lost the library gets it loaded again.
        """
        if self.server_version is None:
            yield from self.check_library()
        attempt = 0
        loads = 0
        installed = None
        while True:
            attempt += 1
            try:
                return (yield call)
            except AuthenticationError as exc:
                raise login_error(f"run {call.name}", exc) from exc
            except CONNECTION_ERRORS as exc:
                if attempt >= 2:
                    raise LimiterUnavailableError(
                        f"Could not run {call.name}: Redis is unreachable ({exc})"
                    ) from exc
                logger.debug("retrying %s after a connection error: %s", call.name, exc)
            except ResponseError as exc:
                if not is_function_missing(exc):
                    raise translate_response_error(exc, call) from exc
                if loads > 0 and installed != packaged_version():
                    # The server kept another version, one without this function.
                    raise translate_response_error(exc, call) from exc
                if loads >= MAX_LIBRARY_LOADS:
                    raise LibraryError(
                        f"Could not run {call.name}: the {LIBRARY_NAME} library vanished "
                        f"from the server again after each of {loads} loads; check what "
                        "runs FUNCTION FLUSH or FUNCTION DELETE there"
                    ) from exc
                loads += 1
                logger.info("%s is missing on the server; checking the library", call.name)
                self.server_version = None
                installed = yield from self.check_library()
            except RedisClusterException as exc:
                raise cluster_error(f"run {call.name}", exc) from exc

    def check_library(self) -> Operation[str]:
        """Read the server's library version, loading the library if it is missing."""
        installed = yield from self.read_version()
        if installed is None:
            installed = yield from self.load_library()
        check_compatible(installed, packaged_version())
        self.server_version = installed
        return installed

    def read_version(self) -> Operation[str | None]:
        """Return the server's library version, or None when it has no library."""
        version_call = FunctionCall(FN_VERSION, (), (), read_only=True)
        try:
            return as_text((yield version_call))
        except AuthenticationError as exc:
            raise login_error(f"check the {LIBRARY_NAME} library", exc) from exc
        except CONNECTION_ERRORS as exc:
            raise LimiterUnavailableError(
                f"Could not check the {LIBRARY_NAME} library: Redis is unreachable ({exc})"
            ) from exc
        except ResponseError as exc:
            if not is_function_missing(exc):
                raise translate_response_error(exc, version_call) from exc
            return None
        except RedisClusterException as exc:
            raise cluster_error(f"check the {LIBRARY_NAME} library", exc) from exc

    def load_library(self) -> Operation[str]:
        """Load the packaged library onto a server that has none.

        Another client may load the library, or flush it again, between any
        two calls, so a load that finds the library present reads its version
        and a version call that finds it gone loads again.
        """
        packaged = packaged_version()
        for _ in range(MAX_LIBRARY_LOADS):
            try:
                yield LoadLibrary(library_source())
            except AuthenticationError as exc:
                raise login_error(f"load the {LIBRARY_NAME} library", exc) from exc
            except CONNECTION_ERRORS as exc:
                raise LimiterUnavailableError(
                    f"Could not load the {LIBRARY_NAME} library: Redis is unreachable ({exc})"
                ) from exc
            except NoPermissionError as exc:
                raise LibraryLoadError(
                    f"Could not load the {LIBRARY_NAME} library {packaged}: this Redis user "
                    "may not run FUNCTION LOAD; run `concurrent-runs load` as a deploy user"
                ) from exc
            except ResponseError as exc:
                if "already exists" not in str(exc):
                    raise LibraryLoadError(
                        f"Could not load the {LIBRARY_NAME} library {packaged}: {exc}"
                    ) from exc
            else:
                logger.info("loaded the %s library %s onto the server", LIBRARY_NAME, packaged)
                return packaged
            # Another client loaded it between our check and our load.
            installed = yield from self.read_version()
            if installed is not None:
                return installed
        raise LibraryLoadError(
            f"Could not load the {LIBRARY_NAME} library {packaged}: it vanished from the "
            f"server again after each of {MAX_LIBRARY_LOADS} tries; check what runs "
            "FUNCTION FLUSH or FUNCTION DELETE there"
        )

    # Operations -----------------------------------------------------------

    def acquire(self, key: KeyT, max_slots: int, wait: float | None) -> Operation[str | None]:
        """Acquire a slot: try once, or wait in line up to `wait` seconds."""
        redis_key = self.redis_key(key)
        check_max_slots(max_slots)
        wait_s = check_wait(wait)
        token = new_token()

        attempted = False
        try:
            if self.unconfirmed:
                yield from self.release_unconfirmed()
            # From here on the token may reach Redis even if the call fails.
            attempted = True
            if wait_s:
                granted = yield from self.wait_in_line(redis_key, max_slots, token, wait_s)
            else:
                acquire_call = FunctionCall(
                    FN_ACQUIRE, (redis_key,), (max_slots, self.slot_timeout_ms, token)
                )
                granted = (yield from self.call_function(acquire_call)) == 1
        except LimiterUnavailableError as exc:
            if attempted:
                self.unconfirmed.append((redis_key, token))
            if not self.fail_open:
                raise
            logger.warning(
                "granting a slot of %r without Redis (fail_open is on): %s", key, exc
            )
            return token
        except (Exception, GeneratorExit):
            raise
        except BaseException:
            # Cancelled or interrupted: the last call may have granted a slot
            # whose reply never arrived, so give back whatever the token holds.
            yield from self.leave_line(redis_key, token)
            raise
        return token if granted else None

    def wait_in_line(
        self, redis_key: KeyT, max_slots: int, token: str, wait_s: float
    ) -> Operation[bool]:
        """Wait for a slot, woken by releases, first come first served.

        Return True once TOKEN holds a slot, or False when `wait_s` ran out;
        then TOKEN has left the line.
        """
        deadline = time.monotonic() + wait_s
        wait_call = FunctionCall(
            FN_WAIT, (redis_key,), (max_slots, self.slot_timeout_ms, token, WAIT_LEASE_MS)
        )
        subscribed: bool | None = None  # None until the first try to subscribe
        while True:
            granted, _ahead, next_end_ms = yield from self.call_function(wait_call)
            if granted == 1:
                if subscribed:
                    # Ended here rather than after the operation, so that a
                    # cancel during it still reaches acquire, which then gives
                    # the slot back.
                    yield Unsubscribe()
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                yield from self.leave_line(redis_key, token)
                return False
            if subscribed is None:
                # A subscription made just now may have missed a wake-up sent
                # after the first call, so ask again at once.
                already_active = yield from self.subscribe(redis_key, token)
                subscribed = already_active is not None
                if subscribed and not already_active:
                    continue
            pause = min(remaining, FALLBACK_POLL_S * _jitter.uniform(0.5, 1.0))
            if next_end_ms >= 0:
                pause = min(pause, next_end_ms / 1000 + 0.002)
            if subscribed:
                yield WaitForMessage(pause)
            else:
                yield Sleep(pause)

    def subscribe(self, channel: KeyT, token: KeyT) -> Operation[bool | None]:
        """Subscribe to wake-ups of TOKEN; return whether the subscription was
        already active, or None when it failed (the waiter then polls)."""
        try:
            already_active = yield Subscribe(channel, token)
        except CONNECTION_ERRORS + (ResponseError,) as exc:
            logger.warning("waiting on %r by polling: could not subscribe: %s", channel, exc)
            return None
        return bool(already_active)

    def leave_line(self, redis_key: KeyT, token: str) -> Operation[None]:
        """Release TOKEN's slot, if any, and its place in line; log a failure instead of raising it."""
        release_call = FunctionCall(FN_RELEASE, (redis_key,), (token,))
        try:
            yield from self.call_function(release_call)
        except ConcurrentRunsError as exc:
            if isinstance(exc, LimiterUnavailableError):
                self.unconfirmed.append((redis_key, token))
            logger.warning(
                "could not leave the line of %r; the place ends with its lease: %s",
                redis_key,
                exc,
            )

    def release_unconfirmed(self) -> Operation[None]:
        """Release the tokens of failed calls that may still have taken effect.

        A server that was frozen or cut off runs the commands it had received
        once it recovers. So an acquire that raised LimiterUnavailableError can
        still take a slot that its caller never learned of, and a release that
        raised may not have run. Releasing those tokens before the next acquire
        frees such slots as soon as Redis replies again, instead of when their
        leases end. Raise LimiterUnavailableError while Redis is still down.
        """
        while self.unconfirmed:
            try:
                redis_key, token = self.unconfirmed.popleft()
            except IndexError:  # another thread took the last one
                return
            release_call = FunctionCall(FN_RELEASE, (redis_key,), (token,))
            try:
                yield from self.call_function(release_call)
            except LimiterUnavailableError:
                self.unconfirmed.appendleft((redis_key, token))
                raise
            except ConcurrentRunsError as exc:
                logger.warning(
                    "could not release slot %s of %r after a failed call; it frees "
                    "itself when its lease ends: %s",
                    token,
                    redis_key,
                    exc,
                )

    def release(self, key: KeyT, token: KeyT) -> Operation[bool]:
        redis_key = self.redis_key(key)
        check_token(token)
        release_call = FunctionCall(FN_RELEASE, (redis_key,), (token,))
        try:
            freed = yield from self.call_function(release_call)
        except LimiterUnavailableError as exc:
            self.unconfirmed.append((redis_key, token))
            if not self.fail_open:
                raise
            logger.warning("could not release a slot of %r (fail_open is on): %s", key, exc)
            return False
        return freed == 1

    def extend(self, key: KeyT, token: KeyT, timeout: float | None) -> Operation[bool]:
        redis_key = self.redis_key(key)
        check_token(token)
        timeout_ms = self.timeout_ms(timeout)
        extend_call = FunctionCall(FN_EXTEND, (redis_key,), (token, timeout_ms))
        extended = yield from self.call_function(extend_call)
        return extended == 1

    def get_count(self, key: KeyT) -> Operation[int]:
        redis_key = self.redis_key(key)
        count_call = FunctionCall(FN_COUNT, (redis_key,), (), read_only=True)
        count = yield from self.call_function(count_call)
        return int(count)

    def get_holders(self, key: KeyT) -> Operation[dict[str, float]]:
        redis_key = self.redis_key(key)
        holders_call = FunctionCall(FN_HOLDERS, (redis_key,), (), read_only=True)
        flat = yield from self.call_function(holders_call)
        return {as_text(flat[i]): int(flat[i + 1]) / 1000 for i in range(0, len(flat), 2)}

    def keep_renewed(
        self, key: KeyT, token: str, slot: "SlotState"
    ) -> Operation[None]:
        """Extend a slot's lease until the stop flag is set, or until it is found lost.

        A connection error is retried while the lease may still be live; once
        the last confirmed lease end has passed the slot counts as lost.
        """
        interval_s = self.slot_timeout * RENEW_FRACTION
        lease_end = time.monotonic() + self.slot_timeout
        pause = interval_s
        while True:
            stop = yield Sleep(pause)
            if stop:
                return
            started = time.monotonic()
            try:
                extended = yield from self.extend(key, token, None)
            except LimiterUnavailableError as exc:
                if time.monotonic() >= lease_end:
                    yield from slot.mark_lost(f"Redis was unreachable until the lease ended: {exc}")
                    return
                logger.warning("could not renew a slot of %r, retrying: %s", key, exc)
                pause = min(interval_s, max(0.05, (lease_end - time.monotonic()) / 3))
                continue
            except ConcurrentRunsError as exc:
                yield from slot.mark_lost(f"renewal failed: {exc}")
                return
            if not extended:
                yield from slot.mark_lost("the lease had ended or the slot was released")
                return
            lease_end = started + self.slot_timeout
            pause = interval_s


class SlotState:
    """The state of a held slot: its key, its token, and whether it was lost."""

    def __init__(
        self,
        key: KeyT,
        max_slots: int,
        wait: float | None,
        renew: bool,
        on_lost: LostCallback | None,
    ) -> None:
        check_key(key)
        check_max_slots(max_slots)
        check_wait(wait)
        if on_lost is not None and not callable(on_lost):
            raise TypeError("on_lost must be a callable taking (key, token)")
        self.key = key
        self.max_slots = max_slots
        self.wait = wait
        self.renew = renew
        self.on_lost = on_lost
        self.token: str | None = None
        self.lost = False

    def in_use_error(self) -> ConcurrentRunsError:
        return ConcurrentRunsError(
            f"Could not enter the slot of {self.key!r}: this slot object is already "
            "held; call slot() once for each with block"
        )

    def begin(self, token: str) -> None:
        """Record the token of a newly held slot."""
        self.token = token
        self.lost = False

    def log_release_failure(self, error: Exception) -> None:
        logger.warning(
            "could not release slot %s of %r; it frees itself when its lease ends: %s",
            self.token,
            self.key,
            error,
        )

    def mark_lost(self, reason: str) -> Operation[None]:
        self.lost = True
        logger.error("lost the slot %s of %r: %s", self.token, self.key, reason)
        if self.on_lost is None:
            return
        # The callback runs in the renewal thread or task, where an exception
        # would end the renewal unseen (sync) or replace the block's own
        # exception at exit (asyncio), so it is logged instead.
        try:
            result = self.on_lost(self.key, self.token or "")
            if inspect.isawaitable(result):
                yield AwaitResult(result)
        except Exception:
            logger.exception("on_lost failed for the slot %s of %r", self.token, self.key)
