"""Fixtures: every test gets a real Redis server.

The server comes from, in order: REDIS_URL (its data is flushed before each
test, so never point it at a server whose data matters); a redis-server from
PATH, started on a free 127.0.0.1 port in a temporary folder; a testcontainers
Redis when a Docker engine answers. With none of these the run fails with a
message that says how to get one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis

from concurrent_runs import AsyncConcurrentRunsLimiter, ConcurrentRunsLimiter
from concurrent_runs.library import library_source

from servers import RedisServer, redis_server_binary

NO_REDIS_MESSAGE = (
    "No Redis server for the tests: install redis-server 7.0 or newer "
    "(Debian/Ubuntu: apt-get install redis-server), or set REDIS_URL to a "
    "throwaway Redis 7 server, or start a Docker engine for testcontainers."
)


def _docker_engine_answers() -> bool:
    try:
        import docker
    except ImportError:
        return False
    try:
        engine = docker.from_env(timeout=3)
        engine.ping()
        engine.close()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the Redis server that the whole session shares."""
    from_env = os.environ.get("REDIS_URL")
    if from_env:
        yield from_env
        return
    if redis_server_binary() is not None:
        with RedisServer(tmp_path_factory.mktemp("redis")) as server:
            yield server.url
        return
    if _docker_engine_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    pytest.fail(NO_REDIS_MESSAGE, pytrace=False)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the shared server, emptied of keys (the library stays)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def loaded_client(redis_client: redis.Redis) -> redis.Redis:
    """A client of a server that holds the packaged library."""
    redis_client.function_load(library_source(), replace=True)
    return redis_client


@pytest.fixture
def key() -> str:
    """A logical key no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def limiter(redis_url: str, loaded_client: redis.Redis) -> Iterator[ConcurrentRunsLimiter]:
    limiter = ConcurrentRunsLimiter(redis_url, slot_timeout=30)
    yield limiter
    limiter.close()


@pytest.fixture
async def async_limiter(
    redis_url: str, loaded_client: redis.Redis
) -> AsyncConcurrentRunsLimiter:
    limiter = AsyncConcurrentRunsLimiter(redis_url, slot_timeout=30)
    yield limiter
    await limiter.close()


@pytest.fixture
def server_folder(tmp_path: Path) -> Path:
    """A folder for a test that starts redis-server processes of its own."""
    if redis_server_binary() is None:
        pytest.fail(NO_REDIS_MESSAGE, pytrace=False)
    return tmp_path
