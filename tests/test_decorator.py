"""The ``limit`` decorator: each call takes a slot of a key built from its arguments."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from concurrent_runs import ConcurrentRunsLimiter, SlotLimitReachedError


class TestLimit:
    def test_limit_key_from_positional_argument(self, limiter, key):
        @limiter.limit("agent:{agent_id}", max_slots=1)
        def run_agent(agent_id: str) -> dict:
            return limiter.get_holders(f"agent:{agent_id}")

        holders = run_agent(key)

        assert len(holders) == 1
        assert limiter.get_count(f"agent:{key}") == 0

    def test_limit_key_from_keyword_and_default_arguments(self, limiter, key):
        @limiter.limit("agent:{agent_id}:{mode}", max_slots=1)
        def run_agent(agent_id: str, mode: str = "fast") -> int:
            return limiter.get_count(f"agent:{agent_id}:{mode}")

        assert run_agent(agent_id=key) == 1
        assert run_agent(key, mode="slow") == 1
        assert run_agent(key, "slow") == 1
        assert limiter.get_count(f"agent:{key}:fast") == 0
        assert limiter.get_count(f"agent:{key}:slow") == 0

    def test_limit_full_key_raises_slot_limit_reached(self, limiter, key):
        calls = []

        @limiter.limit("agent:{agent_id}", max_slots=1)
        def run_agent(agent_id: str) -> None:
            calls.append(agent_id)

        holder = limiter.acquire(f"agent:{key}", 1)

        with pytest.raises(SlotLimitReachedError) as caught:
            run_agent(key)

        assert calls == []
        assert caught.value.key == f"agent:{key}"
        assert limiter.get_holders(f"agent:{key}").keys() == {holder}

    def test_limit_wait_runs_when_slot_comes_free(self, limiter, key):
        @limiter.limit("agent:{agent_id}", max_slots=1, wait=10)
        def run_agent(agent_id: str) -> str:
            return "ran"

        holder = limiter.acquire(f"agent:{key}", 1)
        release_timer = threading.Timer(0.2, limiter.release, (f"agent:{key}", holder))
        release_timer.start()
        try:
            result = run_agent(key)
        finally:
            release_timer.join()

        assert result == "ran"
        assert limiter.get_count(f"agent:{key}") == 0

    def test_limit_function_raising_releases_slot(self, limiter, key):
        @limiter.limit("agent:{agent_id}", max_slots=1)
        def run_agent(agent_id: str) -> None:
            raise ValueError("agent failed")

        with pytest.raises(ValueError, match="agent failed"):
            run_agent(key)

        assert limiter.get_count(f"agent:{key}") == 0

    def test_limit_keeps_function_name_and_doc(self, limiter):
        @limiter.limit("agent:{agent_id}", max_slots=1)
        def run_agent(agent_id: str) -> None:
            """Run one agent."""

        assert run_agent.__name__ == "run_agent"
        assert run_agent.__doc__ == "Run one agent."

    def test_limit_template_naming_unknown_argument_raises_at_decoration(self, limiter):
        def run_agent(agent_id: str) -> None:
            pytest.fail("the function ran without a slot")

        with pytest.raises(ValueError, match="names 'agent', which is not an argument"):
            limiter.limit("agent:{agent}", max_slots=1)(run_agent)

    def test_limit_positional_template_field_raises_at_decoration(self, limiter):
        with pytest.raises(ValueError, match="positional field"):
            limiter.limit("agent:{0}", max_slots=1)(lambda agent_id: None)

    def test_limit_key_from_var_keyword_argument(self, limiter, key):
        @limiter.limit("agent:{agent_id}", max_slots=1)
        def run_agent(**options):
            return limiter.get_count(f"agent:{options['agent_id']}")

        assert run_agent(agent_id=key) == 1
        assert limiter.get_count(f"agent:{key}") == 0

    def test_limit_missing_var_keyword_field_raises(self, limiter):
        @limiter.limit("agent:{agent_id}", max_slots=1)
        def run_agent(**options):
            pytest.fail("the function ran without a slot")

        with pytest.raises(ValueError, match="did not pass"):
            run_agent(other="x")

    def test_limit_coroutine_function_raises_at_decoration(self, limiter):
        async def run_agent(agent_id: str) -> None:
            pass

        with pytest.raises(TypeError, match="AsyncConcurrentRunsLimiter.limit"):
            limiter.limit("agent:{agent_id}", max_slots=1)(run_agent)

    def test_limit_invalid_max_slots_raises_at_decoration(self, limiter):
        with pytest.raises(ValueError):
            limiter.limit("agent:{agent_id}", max_slots=0)

    def test_limit_concurrent_calls_stay_within_max_slots(self, limiter, key):
        running = 0
        max_running = 0
        lock = threading.Lock()

        @limiter.limit("agent:{agent_id}", max_slots=2, wait=30)
        def run_agent(agent_id: str) -> None:
            nonlocal running, max_running
            with lock:
                running += 1
                max_running = max(max_running, running)
            time.sleep(0.05)
            with lock:
                running -= 1

        with ThreadPoolExecutor(6) as pool:
            calls = [pool.submit(run_agent, key) for _ in range(6)]
            for call in calls:
                call.result(timeout=60)

        assert max_running == 2
        assert limiter.get_count(f"agent:{key}") == 0

    def test_limit_renew_keeps_slot_past_slot_timeout(self, redis_url, loaded_client, key):
        limiter = ConcurrentRunsLimiter(redis_url, slot_timeout=0.6)

        @limiter.limit("agent:{agent_id}", max_slots=1, renew=True)
        def run_agent(agent_id: str) -> int:
            time.sleep(1.5)
            return limiter.get_count(f"agent:{agent_id}")

        assert run_agent(key) == 1
        assert limiter.get_count(f"agent:{key}") == 0
        limiter.close()

    async def test_async_limit_key_from_arguments(self, async_limiter, key):
        @async_limiter.limit("agent:{agent_id}:{mode}", max_slots=1)
        async def run_agent(agent_id: str, mode: str = "fast") -> int:
            return await async_limiter.get_count(f"agent:{agent_id}:{mode}")

        assert await run_agent(key) == 1
        assert await run_agent(agent_id=key, mode="slow") == 1
        assert await async_limiter.get_count(f"agent:{key}:fast") == 0
        assert await async_limiter.get_count(f"agent:{key}:slow") == 0

    async def test_async_limit_full_key_raises_slot_limit_reached(self, async_limiter, key):
        calls = []

        @async_limiter.limit("agent:{agent_id}", max_slots=1)
        async def run_agent(agent_id: str) -> None:
            calls.append(agent_id)

        holder = await async_limiter.acquire(f"agent:{key}", 1)

        with pytest.raises(SlotLimitReachedError):
            await run_agent(key)

        assert calls == []
        assert (await async_limiter.get_holders(f"agent:{key}")).keys() == {holder}

    async def test_async_limit_function_raising_releases_slot(self, async_limiter, key):
        @async_limiter.limit("agent:{agent_id}", max_slots=1)
        async def run_agent(agent_id: str) -> None:
            raise ValueError("agent failed")

        with pytest.raises(ValueError, match="agent failed"):
            await run_agent(key)

        assert await async_limiter.get_count(f"agent:{key}") == 0

    async def test_async_limit_concurrent_calls_stay_within_max_slots(
        self, async_limiter, key
    ):
        running = 0
        max_running = 0

        @async_limiter.limit("agent:{agent_id}", max_slots=2, wait=30)
        async def run_agent(agent_id: str) -> None:
            nonlocal running, max_running
            running += 1
            max_running = max(max_running, running)
            await asyncio.sleep(0.05)
            running -= 1

        await asyncio.wait_for(asyncio.gather(*(run_agent(key) for _ in range(6))), 60)

        assert max_running == 2
        assert await async_limiter.get_count(f"agent:{key}") == 0

    async def test_async_limit_keeps_coroutine_function(self, async_limiter):
        @async_limiter.limit("agent:{agent_id}", max_slots=1)
        async def run_agent(agent_id: str) -> None:
            """Run one agent."""

        assert inspect.iscoroutinefunction(run_agent)
        assert run_agent.__name__ == "run_agent"
        assert run_agent.__doc__ == "Run one agent."

    async def test_async_limit_plain_function_raises_at_decoration(self, async_limiter):
        def run_agent(agent_id: str) -> None:
            pass

        with pytest.raises(TypeError, match="ConcurrentRunsLimiter.limit"):
            async_limiter.limit("agent:{agent_id}", max_slots=1)(run_agent)
