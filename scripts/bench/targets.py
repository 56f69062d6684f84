"""The benchmark's targets: each a ratio within one run, checked and explained.

A missed target gets a note that states by how much it was missed and where
the time goes, worked out from the figures of the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from concurrent_runs.library import REAP_BATCH

PAIR_FLOOR_RATIO = 0.75
PAIR_LOCK_RATIO = 1.2
YARDSTICK_RATIO = 1.2
SCALING_RATIO = 1.5
WORST_CALL_US = 1000
CALLS_PER_GRANT = 4.0

# The role of each command inside runs_acquire or runs_release, for the notes.
COMMAND_ROLES = {
    "time": "reads the server clock",
    "zscore": "looks up TOKEN's own slot, so a retried acquire keeps it",
    "zcount": "counts live slots or waiters in line",
    "zrank": "finds TOKEN's place in line",
    "zadd": "writes the slot",
    "zrem": "removes a slot, a waiter or ended entries",
    "zrangebyscore": "lists ended entries to remove",
    "zrevrangebyscore": "finds the latest lease end when the key has no TTL yet",
    "pexpiretime": "reads the key's TTL",
    "pexpireat": "sets the key's TTL",
    "pexpire": "sets the key's TTL",
    "exists": "checks that the key exists",
    "spublish": "wakes waiters",
}


@dataclass
class Target:
    goal: str
    measured: str
    met: bool | None  # None: could not be measured in this run
    note: str = ""


def pair_us(result: dict[str, Any] | None) -> float | None:
    """Return the time of one pair in µs, from the median rate over rounds."""
    if not result or result.get("status") != "ok" or not result.get("pairs_per_s"):
        return None
    return 1e6 / result["pairs_per_s"]


def function_server_us(results: dict[str, Any], name: str) -> float | None:
    row = results.get("server_time", {}).get("calls", {}).get(name)
    return row.get("usec_per_call") if row else None


def ratio_text(value: float) -> str:
    return f"{value:.2f}x"


def missing(goal: str, reason: str) -> Target:
    return Target(goal, "not measured", None, reason)


# Pairs -------------------------------------------------------------------------


def server_pair_us(results: dict[str, Any], group: str) -> float | None:
    """Return the server time of one acquire plus one release of a server-time group."""
    calls = results.get("server_time", {}).get("calls", {})
    names = {
        "runs": ("runs:runs_acquire", "runs:runs_release"),
        "yardstick": ("yardstick:bench_yard_acquire", "yardstick:bench_yard_release"),
        "redis_lock": ("redis_lock:acquire", "redis_lock:release"),
    }[group]
    values = [calls.get(name, {}).get("usec_per_call") for name in names]
    if None in values:
        return None
    return sum(values)


def pair_breakdown(results: dict[str, Any], mode: str) -> list[str]:
    """Explain where a limiter pair's time goes, relative to the floor."""
    pairs = results["pairs"]
    limiter = pair_us(pairs.get(f"{mode}:limiter"))
    floor = pair_us(pairs.get(f"{mode}:floor"))
    raw = pair_us(pairs.get(f"{mode}:fcall"))
    server = server_pair_us(results, "runs")
    if limiter is None or floor is None or raw is None:
        return []
    parts = [
        f"A pair takes {limiter:.0f} µs against {floor:.0f} µs for two PINGs, and "
        f"the same two FCALLs sent raw take {raw:.0f} µs.",
    ]
    if limiter > raw:
        parts.append(
            f"So {limiter - raw:.0f} µs is the wrapper's Python code (argument "
            "checks, key prefix, driving the operation generator), and "
            f"{raw - floor:.0f} µs is the FCALLs themselves."
        )
    else:
        parts.append(
            "The wrapper's own code did not measure above the raw calls in this run, "
            f"so the gap is the FCALLs themselves, {raw - floor:.0f} µs."
        )
    if server is not None and server < raw - floor:
        parts.append(
            f"Of that, {server:.1f} µs is server time of runs_acquire + runs_release "
            "(INFO commandstats), and the rest is client and transport work that a "
            "PING does not have: the token, building and sending a six-argument "
            "command, and reading its reply."
        )
    elif server is not None:
        parts.append(
            f"Server time of runs_acquire + runs_release is {server:.1f} µs per pair "
            "(INFO commandstats)."
        )
    return parts


def closing_estimate(
    results: dict[str, Any], limiter: float, reference: float, threshold: float
) -> str:
    """Estimate the ratio if the functions took the yardstick's server time."""
    ours = server_pair_us(results, "runs")
    yard = server_pair_us(results, "yardstick")
    if ours is None or yard is None or ours <= yard:
        return ""
    estimate = reference / (limiter - (ours - yard))
    verdict = "would meet" if estimate >= threshold else "would still miss"
    return (
        f"As an estimate, if runs_acquire + runs_release took the yardstick's "
        f"{yard:.1f} µs of server time instead of {ours:.1f} µs, the ratio would be "
        f"{ratio_text(estimate)}, which {verdict} the target; the rest of any gap is "
        "client-side."
    )


def floor_target(results: dict[str, Any], mode: str) -> Target:
    name = "ConcurrentRunsLimiter" if mode == "sync" else "AsyncConcurrentRunsLimiter"
    goal = f"{mode}: {name} pairs/s >= {PAIR_FLOOR_RATIO} x two-PING floor"
    pairs = results["pairs"]
    ratio = (pairs.get(f"{mode}:limiter") or {}).get("ratio_to_floor")
    if not ratio:
        return missing(goal, "the limiter or the floor did not run")
    value = ratio["median"]
    met = value >= PAIR_FLOOR_RATIO
    measured = f"{ratio_text(value)} (rounds {ratio['min']:.2f} to {ratio['max']:.2f})"
    if met:
        return Target(goal, measured, met)

    note = [f"Missed by {PAIR_FLOOR_RATIO - value:.2f}."]
    floor = pair_us(pairs.get(f"{mode}:floor"))
    limiter = pair_us(pairs.get(f"{mode}:limiter"))
    if floor and limiter:
        budget = floor / PAIR_FLOOR_RATIO
        note.append(
            f"A pair would have to take {budget:.0f} µs, "
            f"{limiter - budget:.0f} µs less."
        )
    note += pair_breakdown(results, mode)
    if floor and limiter:
        note.append(closing_estimate(results, limiter, floor, PAIR_FLOOR_RATIO))
    return Target(goal, measured, met, " ".join(part for part in note if part))


def lock_target(results: dict[str, Any], mode: str) -> Target:
    lock_label = "redis-py Lock" if mode == "sync" else "redis-py asyncio Lock"
    goal = f"{mode}: limiter pairs/s >= {PAIR_LOCK_RATIO} x {lock_label}"
    pairs = results["pairs"]
    ratio = (pairs.get(f"{mode}:limiter") or {}).get("ratio_to_redis_lock")
    if not ratio:
        return missing(goal, "the limiter or redis-py's Lock did not run")
    value = ratio["median"]
    met = value >= PAIR_LOCK_RATIO
    measured = f"{ratio_text(value)} (rounds {ratio['min']:.2f} to {ratio['max']:.2f})"
    if met:
        return Target(goal, measured, met)

    limiter = pair_us(pairs.get(f"{mode}:limiter"))
    lock = pair_us(pairs.get(f"{mode}:redis_lock"))
    trips = (
        pairs.get(f"{mode}:limiter", {}).get("round_trips_per_pair"),
        pairs.get(f"{mode}:redis_lock", {}).get("round_trips_per_pair"),
    )
    note = [f"Missed by {PAIR_LOCK_RATIO - value:.2f}."]
    if limiter and lock:
        budget = lock / PAIR_LOCK_RATIO
        note.append(
            f"A pair takes {limiter:.0f} µs against the Lock's {lock:.0f} µs, and "
            f"{budget:.0f} µs would meet the target, {limiter - budget:.0f} µs less."
        )
    if None not in trips:
        note.append(
            f"The limiter sends {trips[0]:g} requests per pair and the Lock "
            f"{trips[1]:g}, so a margin of 1.2x cannot come from fewer round trips, "
            "only from less server time and less client code."
        )
    ours = server_pair_us(results, "runs")
    theirs = server_pair_us(results, "redis_lock")
    if ours is not None and theirs is not None:
        note.append(
            f"Server time per pair is {ours:.1f} µs for runs_acquire + runs_release "
            f"against {theirs:.1f} µs for the Lock's SET NX PX + EVALSHA."
        )
    raw = pair_us(pairs.get(f"{mode}:fcall"))
    if limiter and raw and limiter > raw:
        note.append(
            f"The wrapper adds {limiter - raw:.0f} µs per pair of Python code over "
            "raw FCALLs."
        )
    if limiter and lock:
        note.append(closing_estimate(results, limiter, lock, PAIR_LOCK_RATIO))
    return Target(goal, measured, met, " ".join(part for part in note if part))


# Server time -------------------------------------------------------------------


def yardstick_target(results: dict[str, Any]) -> Target:
    goal = f"server time of runs_acquire <= {YARDSTICK_RATIO} x bare-function yardstick"
    server = results.get("server_time", {})
    calls = server.get("calls", {})
    ratio = server.get("acquire_ratio_to_yardstick", {}).get("yardstick")
    ours = calls.get("runs:runs_acquire")
    yard = calls.get("yardstick:bench_yard_acquire")
    if not ratio or not ours or not yard:
        return missing(goal, "the server-time phase did not run")
    value = ratio["median"]
    met = value <= YARDSTICK_RATIO
    measured = (
        f"{ratio_text(value)} ({ours['usec_per_call']:.1f} µs against "
        f"{yard['usec_per_call']:.1f} µs)"
    )
    if met:
        return Target(goal, measured, met)

    budget = yard["usec_per_call"] * YARDSTICK_RATIO
    excess = ours["usec_per_call"] - budget
    ours_count = ours["redis_calls_per_call"]
    yard_count = yard["redis_calls_per_call"]
    noop = calls.get("noop:bench_noop", {}).get("usec_per_call") or 0.0
    rejected = calls.get("rejected:runs_acquire", {}).get("usec_per_call")
    noop_error = calls.get("noop_error:bench_noop_error", {}).get("usec_per_call")
    checks = None
    if rejected is not None and noop_error is not None:
        # The argument checks of an accepted call, without the error reply.
        checks = noop + max(rejected - noop_error, 0.0)
    note = [
        f"Missed by {value - YARDSTICK_RATIO:.2f}: runs_acquire would have to take "
        f"{budget:.1f} µs, {excess:.1f} µs less.",
        f"An FCALL of a function that runs no command costs {noop:.1f} µs.",
    ]
    base = noop
    if checks is not None:
        base = checks
        note.append(
            f"runs_acquire rejecting an empty TOKEN costs {rejected:.1f} µs and a "
            f"function that only replies with an error {noop_error:.1f} µs, so the "
            f"argument checks take about {checks - noop:.1f} µs."
        )
    work_ours = ours["usec_per_call"] - base
    work_yard = yard["usec_per_call"] - noop
    per_ours = work_ours / ours_count if ours_count else 0.0
    per_yard = work_yard / yard_count if yard_count else 0.0
    note.append(
        f"The rest, {work_ours:.1f} µs against the yardstick's {work_yard:.1f} µs, "
        f"is {ours_count:g} Redis commands against {yard_count:g}, and the Lua code "
        f"between them: {per_ours:.1f} µs per command against {per_yard:.1f} µs. "
        f"The commands themselves take {ours['inner_usec_per_call']:.1f} µs against "
        f"{yard['inner_usec_per_call']:.1f} µs (INFO commandstats); the remainder "
        "is the work of each redis.call around its command (building the "
        "arguments, looking up and checking the command, converting the reply) "
        "and the library's own Lua code, such as formatting scores as strings."
    )
    if checks is not None and base - noop >= budget - yard["usec_per_call"]:
        note.append(
            "The argument checks alone take more than the margin the target allows "
            "over the yardstick, which checks nothing."
        )
    if base >= budget:
        note.append(
            "FCALL and the argument checks alone exceed the target's budget, so no "
            "number of commands dropped would meet it."
        )
    elif per_ours > 0:
        fewer = math.ceil(excess / per_ours)
        note.append(
            f"As an estimate, at {per_ours:.1f} µs per command meeting the target "
            f"means about {fewer} fewer commands on the common path (an acquire on a "
            "key with free slots)."
        )
        if ours_count - fewer < yard_count:
            note.append(
                f"That leaves fewer than the yardstick's {yard_count:g}, so the cost "
                "per command has to shrink as well."
            )
    listed = []
    for name, row in ours["inner_commands"].items():
        yard_calls = yard["inner_commands"].get(name, {}).get("calls_per_call", 0)
        extra = row["calls_per_call"] - yard_calls
        if extra > 0.01:
            role = COMMAND_ROLES.get(name, "")
            listed.append(
                f"{name.upper()} x{extra:g} ({row['usec_per_call']:.1f} µs in the "
                f"command{'; ' + role if role else ''})"
            )
    if listed:
        note.append("Commands the yardstick does not run: " + ", ".join(listed) + ".")
    return Target(goal, measured, met, " ".join(note))


# Scaling and the worst call -------------------------------------------------------


def scaling_target(results: dict[str, Any]) -> Target:
    rows = results.get("scaling", {}).get("levels", {}).get("rows", [])
    if len(rows) < 2:
        return missing(f"acquire at many live slots <= {SCALING_RATIO} x empty key", "")
    top = rows[-1]
    goal = (
        f"acquire at {top['live_slots']:,} live slots <= {SCALING_RATIO} x "
        "an empty key (server time)"
    )
    value = top.get("acquire_ratio_to_empty")
    if value is None:
        return missing(goal, "no acquire was logged")
    met = value <= SCALING_RATIO
    measured = (
        f"{ratio_text(value)} (median {top['acquire']['p50_us']:g} µs against "
        f"{rows[0]['acquire']['p50_us']:g} µs)"
    )
    one_slot = next((row for row in rows if row["live_slots"] == 1), None)
    if one_slot and one_slot["acquire"].get("p50_us"):
        against_one = top["acquire"]["p50_us"] / one_slot["acquire"]["p50_us"]
        measured += f"; {ratio_text(against_one)} against a key with 1 live slot"
    note = ""
    if not met:
        note = (
            f"Missed by {value - SCALING_RATIO:.2f}. Each sorted-set command on the "
            "key is O(log N) in its size, and a large key misses the CPU caches more "
            "often, so the cost grows with the number of commands per acquire on the "
            "key."
        )
    return Target(goal, measured, met, note)


def worst_call_target(results: dict[str, Any]) -> Target:
    worst = results.get("worst_call", {})
    count = worst.get("ended_leases", 0)
    goal = (
        f"no single call > {WORST_CALL_US} µs of server time "
        f"with {count:,} ended leases"
    )
    by_function = worst.get("by_function") or {}
    if not by_function:
        return missing(goal, "no call was logged")
    function, row = max(by_function.items(), key=lambda item: item[1]["median_us"])
    value = row["median_us"]
    met = value <= WORST_CALL_US
    measured = f"{value:g} µs ({function}, median of {worst['repeats']})"
    acquire = by_function.get("runs_acquire")
    if acquire and function != "runs_acquire":
        measured += f"; runs_acquire {acquire['median_us']:g} µs"

    slowest = max(by_function.items(), key=lambda item: item[1]["max_us"])
    note = ""
    if not met:
        note = f"Missed by {value - WORST_CALL_US:g} µs, in {function}."
        if function == "runs_reap":
            note += (
                f" runs_reap removes up to {REAP_BATCH} ended entries per call, so its "
                "cost is that batch of sorted-set removals. A smaller batch would "
                "bound it lower, at the price of more calls to clear a key."
            )
    elif slowest[1]["max_us"] > WORST_CALL_US:
        note = (
            f"One {slowest[0]} call took {slowest[1]['max_us']:,} µs, but the median "
            "over fresh keys stayed within the target. SLOWLOG measures wall time, so "
            "a server descheduled on this shared machine shows up as a slow call."
        )
    return Target(goal, measured, met, note)


# Contention ----------------------------------------------------------------------


def contention_target(results: dict[str, Any]) -> Target:
    goal = f"contention with wait: <= {CALLS_PER_GRANT:g} Redis calls per granted slot"
    mode = results.get("contention", {}).get("modes", {}).get("with_wait")
    if not mode or mode.get("client_calls_per_grant") is None:
        return missing(goal, "the contention phase did not run")
    value = mode["client_calls_per_grant"]
    met = value <= CALLS_PER_GRANT
    measured = f"{value:.2f} calls per grant"
    if met:
        return Target(goal, measured, met)

    by_command = mode["client_calls_by_command_per_grant"]
    by_function = mode.get("function_calls_per_grant", {})
    note = [f"Missed by {value - CALLS_PER_GRANT:.2f} calls per grant."]
    listed = ", ".join(
        f"{name.upper()} {calls:.2f}" for name, calls in by_command.items()
    )
    note.append(f"Per grant: {listed}.")
    if by_function:
        functions = ", ".join(
            f"{name} {calls:.2f}" for name, calls in by_function.items()
        )
        note.append(f"FCALLs per grant by function: {functions}.")
    waits = by_function.get("runs_wait", 0)
    if waits > 3:
        note.append(
            f"{waits:.1f} runs_wait per grant: each release sends one message to every "
            "waiter of the key, and every waiting process calls runs_wait again, "
            "although only the first in line can take the slot. Waking only the first "
            "in line (for example by publishing its token) would leave about three per "
            "grant that waits: the first try, the try right after subscribing and one "
            "after the wake-up."
        )
    setup_commands = ("hello", "client|setinfo", "ssubscribe", "sunsubscribe")
    setup = sum(calls for name, calls in by_command.items() if name in setup_commands)
    if setup > 0.2:
        note.append(
            f"Connection setup and SSUBSCRIBE ({setup:.2f} per grant) come from a new "
            "subscription connection for every acquire that waits, because redis-py "
            "disconnects the connection when its PubSub object closes. One "
            "subscription kept open per limiter would save them."
        )
    return Target(goal, measured, met, " ".join(note))


def holders_target(results: dict[str, Any]) -> Target:
    modes = results.get("contention", {}).get("modes", {})
    slots = next((mode["max_slots"] for mode in modes.values()), 3)
    goal = f"contention: peak holders <= {slots} slots, with and without wait"
    if not modes:
        return missing(goal, "the contention phase did not run")
    peaks = {name: mode["peak_holders"] for name, mode in modes.items()}
    met = all(peak <= slots for peak in peaks.values())
    measured = ", ".join(
        f"{name.replace('_', ' ')}: {peak}" for name, peak in peaks.items()
    )
    note = "" if met else "More processes held a slot at once than the limit allows."
    return Target(goal, measured, met, note)


def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    return [
        floor_target(results, "sync"),
        floor_target(results, "async"),
        lock_target(results, "sync"),
        lock_target(results, "async"),
        yardstick_target(results),
        scaling_target(results),
        worst_call_target(results),
        contention_target(results),
        holders_target(results),
    ]
