"""Safety proved from a recorded history of many processes on one server."""

from __future__ import annotations

import multiprocessing
import queue

import pytest

from history import (
    Call,
    Hold,
    WorkerPlan,
    find_excess_holders,
    find_wrong_replies,
    merge,
    run_worker,
)
from servers import RedisServer

WORKERS = 16
ITERATIONS = 140
LIMITS = {"one": 1, "two": 2, "three": 3}
LEASE_MS_CHOICES = (200, 300, 500)
RESULT_TIMEOUT_S = 180


class TestChecker:
    def test_find_excess_holders_overlap_reports_interval(self):
        holds = [
            Hold("k", "a", 1, 100, 300),
            Hold("k", "b", 2, 200, 400),
            Hold("other", "c", 3, 150, 250),
        ]

        report = find_excess_holders(holds, {"k": 1, "other": 1})

        assert report is not None
        assert "key 'k' had 2 live holders (limit 1)" in report
        assert "[200, 300) us" in report
        assert "token a of worker 1 held [100, 300) us" in report
        assert "token b of worker 2 held [200, 400) us" in report

    def test_find_excess_holders_touching_holds_pass(self):
        holds = [Hold("k", "a", 1, 100, 200), Hold("k", "b", 2, 200, 300)]

        assert find_excess_holders(holds, {"k": 1}) is None

    def test_find_excess_holders_within_limit_pass(self):
        holds = [Hold("k", "a", 1, 100, 300), Hold("k", "b", 2, 200, 400)]

        assert find_excess_holders(holds, {"k": 2}) is None

    def test_find_wrong_replies_refused_live_lease_reported(self):
        refused = Call("release", "k", "a", 1, 100, 150, 1000, 2000, False)

        wrong = find_wrong_replies([refused])

        assert len(wrong) == 1
        assert wrong[0].startswith("a live lease was refused: release of token a")

    def test_find_wrong_replies_accepted_ended_lease_reported(self):
        revived = Call("extend", "k", "a", 1, 2500, 2600, 1000, 2000, True)

        wrong = find_wrong_replies([revived])

        assert len(wrong) == 1
        assert wrong[0].startswith("an ended lease was accepted: extend of token a")

    def test_find_wrong_replies_uncertain_lease_either_reply_passes(self):
        near_end = [
            Call("release", "k", "a", 1, 900, 1500, 1000, 2000, True),
            Call("release", "k", "b", 1, 900, 1500, 1000, 2000, False),
        ]

        assert find_wrong_replies(near_end) == []


def test_history_of_many_processes_never_exceeds_limit(server_folder):
    context = multiprocessing.get_context("spawn")
    with RedisServer(server_folder) as server:
        start_barrier = context.Barrier(WORKERS)
        results = context.Queue()
        processes = [
            context.Process(
                target=run_worker,
                args=(
                    WorkerPlan(
                        redis_url=server.url,
                        worker=worker,
                        seed=worker * 7919,
                        limits=LIMITS,
                        lease_ms_choices=LEASE_MS_CHOICES,
                        iterations=ITERATIONS,
                    ),
                    start_barrier,
                    results,
                ),
            )
            for worker in range(WORKERS)
        ]
        for process in processes:
            process.start()
        try:
            outcomes = [results.get(timeout=RESULT_TIMEOUT_S) for _ in processes]
        except queue.Empty:
            pytest.fail(f"a worker sent no history within {RESULT_TIMEOUT_S} s")
        finally:
            for process in processes:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
                    process.join()

    errors = [detail for status, detail in outcomes if status == "error"]
    assert errors == []
    history = merge(detail for _, detail in outcomes)

    assert history.call_count >= 2000
    for key in LIMITS:
        assert history.granted.get(key, 0) > 0, f"no acquire of {key!r} was granted"
    assert sum(history.refused.values()) > 0, "no acquire was refused: no contention"
    excess = find_excess_holders(history.holds, LIMITS)
    assert excess is None, excess
    wrong = find_wrong_replies(history.calls)
    assert wrong == [], "\n".join(wrong[:10])
    for name in ("extend", "release"):
        ended = [
            call for call in history.calls
            if call.name == name and call.sent_after_us >= call.dead_from_us
        ]
        assert ended, f"no {name} met an ended lease"
