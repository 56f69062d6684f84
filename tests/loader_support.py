"""Library sources of other versions, and helpers shared by the loader tests."""

from __future__ import annotations

from urllib.parse import urlparse

import redis

from concurrent_runs.library import library_source, packaged_version, parse_version

PACKAGED = packaged_version()
MAJOR, MINOR, PATCH = parse_version(PACKAGED)

# A newer release of the same major version: loading the package downgrades it.
NEWER_PATCH = f"{MAJOR}.{MINOR}.{PATCH + 1}"
# The previous major version: loading the package is a major upgrade.
OLDER_MAJOR = f"{MAJOR - 1}.9.0"
# The next major version: loading the package is a downgrade.
NEWER_MAJOR = f"{MAJOR + 1}.0.0"


def older_same_major() -> str:
    """Return a version below the packaged one that shares its major version."""
    if PATCH > 0:
        return f"{MAJOR}.{MINOR}.{PATCH - 1}"
    if MINOR > 0:
        return f"{MAJOR}.{MINOR - 1}.0"
    raise AssertionError(
        f"the packaged version {PACKAGED} is the first of its major version, so no "
        "older version shares it; change the upgrade tests to start from a patch"
    )


OLDER_MINOR = older_same_major()

# A library of the same name that registers no runs_version function.
UNVERSIONED_SOURCE = (
    "#!lua name=concurrent_runs\n"
    "redis.register_function('runs_count', function(keys, args) return 0 end)\n"
)


def source_with_version(version: str) -> str:
    """Return the packaged Lua source with its VERSION line set to ``version``."""
    packaged_line = f"local VERSION = '{PACKAGED}'"
    source = library_source()
    assert packaged_line in source
    return source.replace(packaged_line, f"local VERSION = '{version}'", 1)


def load_version(client: redis.Redis, version: str) -> None:
    """Replace the server's library with a copy of the packaged one at ``version``."""
    client.function_load(source_with_version(version), replace=True)


def installed_version(client: redis.Redis) -> str | None:
    """Return the server's runs_version, or None when no library is loaded."""
    if not client.function_list(library="concurrent_runs"):
        return None
    return client.fcall_ro("runs_version", 0).decode()


def address_of(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.hostname}:{parsed.port}"


def add_ended_slots(client: redis.Redis, redis_key: str, count: int) -> None:
    """Add ``count`` slots whose leases ended in 1970, as crashed holders leave them.

    A slot is a sorted-set member scored by its lease end in ms, so a score
    below the server's clock is an ended slot. ZADD writes them directly
    because runs_acquire itself removes ended slots, a few per call.
    """
    members = {f"ended-{index}": index + 1 for index in range(count)}
    client.zadd(redis_key, members)
