"""Lease renewal: ``slot(..., renew=True)`` keeps a slot alive while its block runs.

The renewal extends the lease every third of slot_timeout. When it finds the
lease gone, it logs an error, sets ``Slot.lost`` and calls ``on_lost``. When
Redis cannot be reached, it retries until the last lease it secured has
ended, and only then counts the slot as lost.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import pytest

from concurrent_runs import ConcurrentRunsLimiter, _core, acquire_slot, get_concurrent_limiter
from servers import RedisServer
from test_waiting import fcall_count, redis_key, wait_until
from test_waiting import process_limiter_env  # noqa: F401 (a fixture)

SHORT_SLOT_TIMEOUT_S = 0.6
# The outage tests need room for a few renewal tries, each of which takes
# about four socket timeouts against a paused server.
OUTAGE_SLOT_TIMEOUT_S = 2.0
OUTAGE_SOCKET_TIMEOUT_S = 0.1
# Time a request may take between the renewal noting its start and Redis
# running it. A lost slot may be declared that much before its lease ends.
REQUEST_SLACK_S = 0.05


class ReleaseRecordingLimiter(ConcurrentRunsLimiter):
    """A limiter that keeps what each release returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release_results: list[bool] = []

    def release(self, key, token):
        freed = super().release(key, token)
        self.release_results.append(freed)
        return freed


class LostRecorder:
    """An on_lost callback that records its calls and the time of the first."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str]] = []
        self.called = threading.Event()
        self.at: float | None = None

    def __call__(self, key: Any, token: str) -> None:
        if self.at is None:
            self.at = time.monotonic()
        self.calls.append((key, token))
        self.called.set()


def limiter_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "concurrent_runs" and r.levelno == level]


def renewal_retries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in limiter_records(caplog, logging.WARNING)
        if r.getMessage().startswith("could not renew")
    ]


class TestRenewal:
    def test_renew_keeps_slot_past_slot_timeout(self, redis_url, loaded_client, key):
        limiter = ReleaseRecordingLimiter(redis_url, slot_timeout=SHORT_SLOT_TIMEOUT_S)

        with limiter.slot(key, 1, renew=True) as token:
            for _ in range(8):
                time.sleep(0.25)
                assert limiter.get_count(key) == 1
            assert limiter.get_holders(key).keys() == {token}
        limiter.close()

        assert limiter.release_results == [True]
        assert limiter.get_count(key) == 0

    def test_acquire_slot_renew_keeps_slot(self, process_limiter_env, key):
        process_limiter_env.setenv("CONCURRENT_RUNS_SLOT_TIMEOUT", str(SHORT_SLOT_TIMEOUT_S))

        with acquire_slot(key, 1, renew=True) as token:
            time.sleep(SHORT_SLOT_TIMEOUT_S * 2.5)
            holders = get_concurrent_limiter().get_holders(key)

        assert get_concurrent_limiter().slot_timeout == SHORT_SLOT_TIMEOUT_S
        assert holders.keys() == {token}
        assert get_concurrent_limiter().get_count(key) == 0

    def test_no_renew_slot_ends_after_slot_timeout(self, redis_url, loaded_client, key):
        limiter = ReleaseRecordingLimiter(redis_url, slot_timeout=SHORT_SLOT_TIMEOUT_S)

        with limiter.slot(key, 1) as token:
            assert wait_until(lambda: limiter.get_count(key) == 0, timeout_s=5)
            assert token not in limiter.get_holders(key)
        limiter.close()

        assert limiter.release_results == [False]

    def test_renewal_stops_on_exit(self, server_folder, key, caplog):
        with RedisServer(server_folder) as server, server.client() as admin:
            limiter = ConcurrentRunsLimiter(server.url, slot_timeout=SHORT_SLOT_TIMEOUT_S)
            slot = limiter.slot(key, 1, renew=True)
            with slot:
                time.sleep(SHORT_SLOT_TIMEOUT_S)
            calls_after_exit = fcall_count(admin)
            # Three renewal intervals: a renewal still running would call.
            time.sleep(SHORT_SLOT_TIMEOUT_S)
            calls_later = fcall_count(admin)
            limiter.close()

        assert calls_later == calls_after_exit
        assert slot.lost is False
        assert limiter_records(caplog, logging.ERROR) == []

    @pytest.mark.parametrize("removal", ["release", "zrem"])
    def test_renewal_lease_gone_marks_lost(
        self, redis_url, loaded_client, key, caplog, removal
    ):
        limiter = ConcurrentRunsLimiter(redis_url, slot_timeout=SHORT_SLOT_TIMEOUT_S)
        on_lost = LostRecorder()
        slot = limiter.slot(key, 1, renew=True, on_lost=on_lost)

        with slot as token:
            if removal == "release":
                assert limiter.release(key, token) is True
            else:
                assert loaded_client.zrem(redis_key(key), token) == 1
            assert on_lost.called.wait(5)
            assert slot.lost is True
        limiter.close()

        assert on_lost.calls == [(key, token)]
        errors = limiter_records(caplog, logging.ERROR)
        assert len(errors) == 1
        assert token in errors[0].getMessage()
        assert limiter.get_count(key) == 0

    def test_renewal_on_lost_raising_is_logged(self, redis_url, loaded_client, key, caplog):
        limiter = ConcurrentRunsLimiter(redis_url, slot_timeout=SHORT_SLOT_TIMEOUT_S)
        called = threading.Event()

        def on_lost(lost_key: Any, lost_token: str) -> None:
            called.set()
            raise RuntimeError("on_lost failed")

        slot = limiter.slot(key, 1, renew=True, on_lost=on_lost)
        with slot as token:
            limiter.release(key, token)
            assert called.wait(5)
            assert wait_until(lambda: len(limiter_records(caplog, logging.ERROR)) == 2)
        limiter.close()

        assert slot.lost is True
        errors = limiter_records(caplog, logging.ERROR)
        assert errors[1].exc_info is not None
        assert "on_lost failed" in str(errors[1].exc_info[1])

    def test_renewal_server_paused_briefly_keeps_slot(self, server_folder, key, caplog):
        with RedisServer(server_folder) as server:
            limiter = ReleaseRecordingLimiter(
                server.url,
                slot_timeout=OUTAGE_SLOT_TIMEOUT_S,
                socket_timeout=OUTAGE_SOCKET_TIMEOUT_S,
            )
            on_lost = LostRecorder()
            slot = limiter.slot(key, 1, renew=True, on_lost=on_lost)
            with slot as token:
                server.signal(signal.SIGSTOP)
                try:
                    assert wait_until(lambda: renewal_retries(caplog), timeout_s=5)
                finally:
                    server.signal(signal.SIGCONT)
                # One more renewal interval: the retry reaches Redis in time.
                time.sleep(OUTAGE_SLOT_TIMEOUT_S * _core.RENEW_FRACTION + 0.2)
                assert slot.lost is False
                assert limiter.get_holders(key).keys() == {token}
            limiter.close()

        assert on_lost.calls == []
        assert limiter.release_results == [True]
        assert limiter_records(caplog, logging.ERROR) == []

    @pytest.mark.parametrize("outage", ["paused", "stopped"])
    def test_renewal_server_unreachable_past_lease_marks_lost(
        self, server_folder, key, caplog, outage
    ):
        with RedisServer(server_folder) as server:
            limiter = ConcurrentRunsLimiter(
                server.url,
                slot_timeout=OUTAGE_SLOT_TIMEOUT_S,
                socket_timeout=OUTAGE_SOCKET_TIMEOUT_S,
            )
            on_lost = LostRecorder()
            slot = limiter.slot(key, 1, renew=True, on_lost=on_lost)
            with slot as token:
                read_at = time.monotonic()
                seconds_left = limiter.get_holders(key)[token]
                if outage == "paused":
                    server.signal(signal.SIGSTOP)
                else:
                    server.stop()
                try:
                    assert on_lost.called.wait(OUTAGE_SLOT_TIMEOUT_S + 5)
                finally:
                    if outage == "paused":
                        server.signal(signal.SIGCONT)
                assert slot.lost is True
                if outage == "paused":
                    # Requests that timed out run now; none may revive the lease.
                    assert limiter.get_count(key) == 0
            limiter.close()

        assert on_lost.calls == [(key, token)]
        # The lease that Redis last confirmed ended no earlier than this.
        assert on_lost.at >= read_at + seconds_left - REQUEST_SLACK_S
        retries = renewal_retries(caplog)
        errors = limiter_records(caplog, logging.ERROR)
        assert len(retries) >= 1
        assert len(errors) == 1
        assert max(r.created for r in retries) <= errors[0].created
