"""Exceptions raised by concurrent_runs; every one derives from ConcurrentRunsError."""

from __future__ import annotations


class ConcurrentRunsError(RuntimeError):
    """Base class of every error this package raises."""


class SlotLimitReachedError(ConcurrentRunsError):
    """No slot of the key came free in time (or at once, without ``wait``)."""

    def __init__(self, key: str | bytes, max_slots: int, wait: float | None) -> None:
        self.key = key
        self.max_slots = max_slots
        self.wait = wait
        if wait is None:
            detail = "all slots are taken"
        else:
            detail = f"no slot came free within {wait:g} s"
        super().__init__(
            f"Could not acquire a slot of {key!r} (max_slots={max_slots}): {detail}"
        )


class LimiterUnavailableError(ConcurrentRunsError):
    """Redis could not be reached, or did not reply within the socket timeout."""


class InvalidArgumentError(ConcurrentRunsError, ValueError):
    """The Redis library rejected an argument; the key was left unchanged."""


class LibraryError(ConcurrentRunsError):
    """The concurrent_runs library on the server is missing or unusable."""


class LibraryVersionError(LibraryError):
    """The server holds a library version this package cannot work with."""

    def __init__(self, installed: str, packaged: str, message: str) -> None:
        self.installed = installed
        self.packaged = packaged
        super().__init__(message)


class LibraryLoadError(LibraryError):
    """The packaged library could not be loaded onto the server."""
