def test_acquire_then_release_frees_slot(limiter, key):
    token = limiter.acquire(key, 1)
    assert token is not None
    assert limiter.acquire(key, 1) is None
    assert limiter.release(key, token) is True
    assert limiter.get_count(key) == 0


async def test_async_slot_releases_on_exit(async_limiter, key):
    async with async_limiter.slot(key, 1) as token:
        assert await async_limiter.get_count(key) == 1
    assert await async_limiter.get_count(key) == 0
