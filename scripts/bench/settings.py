"""Counts and sizes of a full run and of a quick one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Settings:
    """How much work each phase does."""

    mode: str
    pair_rounds: int  # round-robin rounds over all contenders
    pair_batch: int  # acquire+release pairs per contender per round
    warmup_pairs: int
    round_trip_pairs: int  # pairs counted on a counting connection
    server_rounds: int
    server_batch: int  # calls per function per round
    scale_levels: tuple[int, ...]  # live slots on one key; 0 is the empty key
    scale_rounds: int
    scale_batch: int
    other_keys: int  # keys added for the "many other keys" measurement
    ended_leases: int  # ended leases on the key of the worst-call measurement
    worst_repeats: int
    contention_processes: int
    contention_slots: int
    contention_s: float  # length of each contention run
    hold_s: float  # how long a contention worker keeps its slot
    retry_pause_s: float  # pause after a refused acquire without wait

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Settings(
    mode="full",
    pair_rounds=60,
    pair_batch=80,
    warmup_pairs=200,
    round_trip_pairs=50,
    server_rounds=40,
    server_batch=100,
    scale_levels=(0, 1, 100, 10_000, 100_000),
    scale_rounds=8,
    scale_batch=200,
    other_keys=1_000_000,
    ended_leases=100_000,
    worst_repeats=5,
    contention_processes=8,
    contention_slots=3,
    contention_s=4.0,
    hold_s=0.002,
    retry_pause_s=0.001,
)

QUICK = Settings(
    mode="quick",
    pair_rounds=3,
    pair_batch=30,
    warmup_pairs=10,
    round_trip_pairs=5,
    server_rounds=3,
    server_batch=30,
    scale_levels=(0, 1, 100, 1_000),
    scale_rounds=2,
    scale_batch=20,
    other_keys=10_000,
    ended_leases=2_000,
    worst_repeats=1,
    contention_processes=8,
    contention_slots=3,
    contention_s=0.5,
    hold_s=0.002,
    retry_pause_s=0.001,
)
