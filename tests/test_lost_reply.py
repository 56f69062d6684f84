"""A reply lost after Redis ran the command: the retry takes no second slot.

How the tests lose a reply, on a real server and without a proxy:

1. The limiter's client connects under a known name, and a second raw
   connection (the killer) connects and is accepted.
2. The server gets SIGSTOP. The limiter sends its FCALL, which waits unread
   in the server's socket, where the test finds it in /proc/net/tcp.
3. The killer sends ``CLIENT KILL ID <limiter's connection>``, which waits
   unread behind it.
4. SIGCONT. Redis reads both sockets in one turn of its event loop, in the
   order their data arrived (epoll reports sockets in the order they became
   readable): it runs the FCALL and queues the reply, then runs CLIENT KILL,
   which closes the connection before the queued reply is written.

The client sees the connection drop and retries with the same token. The
server's FCALL count tells that the first call did run: two FCALLs, not one.
Now and then the kernel reports the killer's socket first, CLIENT KILL runs
before the FCALL, and the count is one; each test then tries again, up to
ATTEMPTS times, and checks the outcome of the attempt that lost the reply.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from concurrent_runs import AsyncConcurrentRunsLimiter, ConcurrentRunsLimiter
from servers import LOCALHOST, RedisServer
from test_waiting import fcall_count, wait_until

CLIENT_NAME = "lost-reply"
SLOT_TIMEOUT_S = 60


def queued_bytes(server_port: int, peer_port: int) -> int:
    """Return the bytes a connection sent that the server has not read yet."""
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{peer_port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return int(fields[4].split(":")[1], 16)
    return 0


def resp_command(*words: str) -> bytes:
    encoded = [word.encode() for word in words]
    parts = [b"*%d\r\n" % len(encoded)]
    parts += [b"$%d\r\n%s\r\n" % (len(word), word) for word in encoded]
    return b"".join(parts)


class ReplyCutter:
    """Kill a named client's connection right after Redis ran its next command."""

    def __init__(self, server: RedisServer, admin: redis.Redis, client_name: str) -> None:
        victims = [c for c in admin.client_list() if c["name"] == client_name]
        assert len(victims) == 1, f"expected one connection named {client_name!r}"
        self.server = server
        self.victim_id = victims[0]["id"]
        self.victim_port = int(victims[0]["addr"].rsplit(":", 1)[1])
        self.killer = socket.create_connection((LOCALHOST, server.port), timeout=10)
        self.killer.sendall(resp_command("PING"))
        assert self.killer.recv(64) == b"+PONG\r\n"
        self.killer_port = self.killer.getsockname()[1]

    def freeze(self) -> None:
        self.server.signal(signal.SIGSTOP)

    def cut(self) -> bytes:
        """Queue CLIENT KILL behind the victim's command, resume, return its reply."""
        try:
            assert wait_until(lambda: queued_bytes(self.server.port, self.victim_port) > 0)
            self.killer.sendall(resp_command("CLIENT", "KILL", "ID", str(self.victim_id)))
            assert wait_until(lambda: queued_bytes(self.server.port, self.killer_port) > 0)
        finally:
            self.server.signal(signal.SIGCONT)
        return self.killer.recv(64)

    def close(self) -> None:
        self.killer.close()


def sync_limiter(url: str, retry_by: str) -> ConcurrentRunsLimiter:
    named_url = f"{url}?client_name={CLIENT_NAME}"
    if retry_by == "redis-py":
        return ConcurrentRunsLimiter(named_url, slot_timeout=SLOT_TIMEOUT_S)
    client = redis.Redis.from_url(named_url, retry=Retry(NoBackoff(), 0))
    return ConcurrentRunsLimiter(client=client, slot_timeout=SLOT_TIMEOUT_S)


def async_limiter_of(url: str, retry_by: str) -> AsyncConcurrentRunsLimiter:
    named_url = f"{url}?client_name={CLIENT_NAME}"
    if retry_by == "redis-py":
        return AsyncConcurrentRunsLimiter(named_url, slot_timeout=SLOT_TIMEOUT_S)
    no_retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
    client = redis.asyncio.Redis.from_url(named_url, retry=no_retry)
    return AsyncConcurrentRunsLimiter(client=client, slot_timeout=SLOT_TIMEOUT_S)


# Whose retry repeats the call: redis-py's own (the limiter builds the client
# with one retry), or the limiter's, for a client that never retries.
RETRY_BY = ["redis-py", "limiter"]
ATTEMPTS = 5
MISSED = "no attempt lost the reply: CLIENT KILL ran before the FCALL each time"


class TestLostReply:
    @pytest.mark.parametrize("retry_by", RETRY_BY)
    @pytest.mark.parametrize("wait", [None, 5])
    def test_acquire_reply_lost_takes_one_slot(self, server_folder, key, retry_by, wait):
        for attempt in range(ATTEMPTS):
            with RedisServer(server_folder / str(attempt)) as server, server.client() as admin:
                limiter = sync_limiter(server.url, retry_by)
                limiter.get_count(key)  # connects and loads the library
                cutter = ReplyCutter(server, admin, CLIENT_NAME)
                fcalls_before = fcall_count(admin)

                cutter.freeze()
                with ThreadPoolExecutor(1) as pool:
                    acquiring = pool.submit(limiter.acquire, key, 1, wait)
                    kill_reply = cutter.cut()
                    token = acquiring.result(timeout=20)

                fcalls = fcall_count(admin) - fcalls_before
                holders = limiter.get_holders(key)
                freed = limiter.release(key, token) if token else None
                cutter.close()
                limiter.close()
            if fcalls == 2:
                break
        else:
            pytest.fail(MISSED)

        assert kill_reply == b":1\r\n"
        assert token is not None
        assert holders.keys() == {token}
        assert freed is True

    @pytest.mark.parametrize("retry_by", RETRY_BY)
    def test_release_reply_lost_frees_slot(self, server_folder, key, retry_by):
        for attempt in range(ATTEMPTS):
            with RedisServer(server_folder / str(attempt)) as server, server.client() as admin:
                limiter = sync_limiter(server.url, retry_by)
                token = limiter.acquire(key, 1)
                cutter = ReplyCutter(server, admin, CLIENT_NAME)
                fcalls_before = fcall_count(admin)

                cutter.freeze()
                with ThreadPoolExecutor(1) as pool:
                    releasing = pool.submit(limiter.release, key, token)
                    kill_reply = cutter.cut()
                    freed = releasing.result(timeout=20)

                fcalls = fcall_count(admin) - fcalls_before
                count = limiter.get_count(key)
                cutter.close()
                limiter.close()
            if fcalls == 2:
                break
        else:
            pytest.fail(MISSED)

        assert kill_reply == b":1\r\n"
        assert count == 0
        # NOTE: the retry finds the slot freed already, so release() returns
        # False although this very call freed it.
        assert freed is False

    @pytest.mark.parametrize("retry_by", RETRY_BY)
    @pytest.mark.parametrize("wait", [None, 5])
    async def test_async_acquire_reply_lost_takes_one_slot(
        self, server_folder, key, retry_by, wait
    ):
        for attempt in range(ATTEMPTS):
            with RedisServer(server_folder / str(attempt)) as server, server.client() as admin:
                limiter = async_limiter_of(server.url, retry_by)
                await limiter.get_count(key)
                cutter = ReplyCutter(server, admin, CLIENT_NAME)
                fcalls_before = fcall_count(admin)

                cutter.freeze()
                acquiring = asyncio.create_task(limiter.acquire(key, 1, wait))
                kill_reply = await asyncio.to_thread(cutter.cut)
                token = await asyncio.wait_for(acquiring, 20)

                fcalls = fcall_count(admin) - fcalls_before
                holders = await limiter.get_holders(key)
                freed = await limiter.release(key, token) if token else None
                cutter.close()
                await limiter.close()
            if fcalls == 2:
                break
        else:
            pytest.fail(MISSED)

        assert kill_reply == b":1\r\n"
        assert token is not None
        assert holders.keys() == {token}
        assert freed is True
