"""The packaged Redis Functions library: its source, version and function names."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

LIBRARY_NAME = "concurrent_runs"
LIBRARY_FILE = "concurrent_runs.lua"

FN_ACQUIRE = "runs_acquire"
FN_WAIT = "runs_wait"
FN_RELEASE = "runs_release"
FN_EXTEND = "runs_extend"
FN_COUNT = "runs_count"
FN_HOLDERS = "runs_holders"
FN_REAP = "runs_reap"
FN_VERSION = "runs_version"

# Maximum number of ended slots one runs_reap call removes.
REAP_BATCH = 250

_VERSION_LINE = re.compile(r"^local VERSION = '(\d+\.\d+\.\d+)'$", re.MULTILINE)

# A source checkout keeps the library in functions/, two folders above this
# package; an installed wheel carries it as package data instead.
_CHECKOUT_PATH = Path(__file__).resolve().parents[2] / "functions" / LIBRARY_FILE


@lru_cache(maxsize=1)
def library_source() -> str:
    """Return the Lua source of the packaged library."""
    packaged = resources.files(__package__).joinpath(LIBRARY_FILE)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return _CHECKOUT_PATH.read_text(encoding="utf-8")


def packaged_version() -> str:
    """Return the version of the packaged library, as 'MAJOR.MINOR.PATCH'."""
    match = _VERSION_LINE.search(library_source())
    if match is None:
        raise RuntimeError(f"no VERSION line found in the packaged {LIBRARY_FILE}")
    return match.group(1)


def parse_version(text: str) -> tuple[int, int, int]:
    """Split 'MAJOR.MINOR.PATCH' into three integers, or raise ValueError."""
    parts = text.split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise ValueError(f"invalid library version {text!r}: expected MAJOR.MINOR.PATCH")
    major, minor, patch = (int(part) for part in parts)
    return major, minor, patch
