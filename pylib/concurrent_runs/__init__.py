"""At most N concurrent runs of a key, enforced by a Redis Functions library.

Each run holds a slot named by a random token, and each slot has a lease, so a
crashed holder's slot frees itself. Every decision is made atomically inside
Redis, by the library in ``concurrent_runs.lua``, on Redis server time.
"""

from .aio import (
    AsyncConcurrentRunsLimiter,
    AsyncSlot,
    async_acquire_slot,
    get_async_concurrent_limiter,
)
from .client import ConcurrentRunsLimiter, Slot, acquire_slot, get_concurrent_limiter
from .errors import (
    ConcurrentRunsError,
    InvalidArgumentError,
    LibraryError,
    LibraryLoadError,
    LibraryVersionError,
    LimiterUnavailableError,
    SlotLimitReachedError,
)
from .library import packaged_version

__version__ = "1.1.0"

__all__ = [
    "AsyncConcurrentRunsLimiter",
    "AsyncSlot",
    "ConcurrentRunsError",
    "ConcurrentRunsLimiter",
    "InvalidArgumentError",
    "LibraryError",
    "LibraryLoadError",
    "LibraryVersionError",
    "LimiterUnavailableError",
    "Slot",
    "SlotLimitReachedError",
    "acquire_slot",
    "async_acquire_slot",
    "get_async_concurrent_limiter",
    "get_concurrent_limiter",
    "packaged_version",
]
