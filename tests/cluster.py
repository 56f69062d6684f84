"""Throwaway Redis Cluster and replication setups on 127.0.0.1 for the test suite.

``LocalCluster`` starts redis-server processes with cluster mode on, joins
them with ``redis-cli --cluster create`` and waits until every node agrees on
the topology. ``PrimaryWithReplica`` is a plain primary with one replica
attached by ``--replicaof``. Test modules use the fixtures with::

    from cluster import redis_cluster  # noqa: F401
"""

from __future__ import annotations

import collections
import random
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from concurrent_runs import ConcurrentRunsLimiter, LimiterUnavailableError
from concurrent_runs.library import library_source

from servers import LOCALHOST, RedisServer, free_port, redis_server_binary

# A failed node is noticed after this long; small, so failover tests stay fast.
NODE_TIMEOUT_MS = 2000
READY_TIMEOUT_S = 30.0
POLL_S = 0.05
CLIENT_TIMEOUT_S = 5.0
# Replicas sync at once, not after the default 5 s diskless-sync delay. A
# replica of an idle primary keeps replication offset 0, which hides it from
# CLUSTER SLOTS, until the primary's first replication ping (every 10 s by
# default).
FAST_SYNC_ARGS = ("--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1")

NO_REDIS_CLI_MESSAGE = (
    "The cluster tests need redis-server and redis-cli 7.0 or newer on PATH "
    "(Debian/Ubuntu: apt-get install redis-server)."
)


class ClusterNotReadyError(RuntimeError):
    """The local cluster did not reach a stable, healthy state in time."""


def server_role(server: RedisServer) -> str:
    """Return 'master' or 'slave', as the server's ROLE command reports it now."""
    with server.client(socket_timeout=CLIENT_TIMEOUT_S) as client:
        role = client.execute_command("ROLE")
    return redis.utils.str_if_bytes(role[0])


def replication_info(server: RedisServer) -> dict:
    with server.client(socket_timeout=CLIENT_TIMEOUT_S) as client:
        return client.info("replication")


def command_calls(server: RedisServer, command: str) -> int:
    """Return how many times ``server`` has run ``command`` (INFO commandstats)."""
    with server.client(socket_timeout=CLIENT_TIMEOUT_S) as client:
        stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command.lower()}", {}).get("calls", 0))


def library_source_of_version(version: str) -> str:
    """Return the packaged Lua source with its VERSION line set to ``version``."""
    source, count = re.subn(
        r"^local VERSION = '[^']*'$",
        f"local VERSION = '{version}'",
        library_source(),
        flags=re.MULTILINE,
    )
    if count != 1:
        raise RuntimeError("the packaged library has no single VERSION line")
    return source


def installed_version(server: RedisServer) -> str:
    """Return what ``FCALL_RO runs_version 0`` replies on ``server``."""
    with server.client(socket_timeout=CLIENT_TIMEOUT_S) as client:
        return redis.utils.str_if_bytes(client.fcall_ro("runs_version", 0))


def slot_map_of(client: redis.Redis) -> tuple:
    """Return CLUSTER SLOTS as sorted (start, end, primary port, replica ports)."""
    ranges = []
    for start, end, primary, *replicas in client.cluster("SLOTS"):
        replica_ports = tuple(sorted(int(replica[1]) for replica in replicas))
        ranges.append((start, end, int(primary[1]), replica_ports))
    return tuple(sorted(ranges))


def wait_for(
    problem_of: Callable[[], str | None], timeout_s: float, failure: str
) -> None:
    """Poll ``problem_of()`` until it returns None, the sign that all is well.

    Raise ClusterNotReadyError with ``failure`` and the last problem reported
    when ``timeout_s`` runs out first.
    """
    deadline = time.monotonic() + timeout_s
    problem = None
    while time.monotonic() < deadline:
        problem = problem_of()
        if problem is None:
            return
        time.sleep(POLL_S)
    raise ClusterNotReadyError(f"{failure} within {timeout_s:g} s: {problem}")


class LocalCluster:
    """A Redis Cluster of ``primaries`` shards with ``replicas_per_primary`` each.

    Every node is a ``RedisServer`` with persistence off, in its own folder
    under ``folder``, on a free 127.0.0.1 port. Its cluster bus listens on
    another free port (``cluster-port``), so no port 10000 above the client
    port has to be free. Roles change on failover, so ``primaries()`` and
    ``replicas()`` query the servers each time.
    """

    def __init__(
        self,
        folder: Path,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        self.folder = Path(folder)
        self.primary_count = primaries
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        self.redis_cli = shutil.which("redis-cli")
        if self.redis_cli is None or redis_server_binary() is None:
            raise RuntimeError(NO_REDIS_CLI_MESSAGE)

    @property
    def size(self) -> int:
        return self.primary_count * (1 + self.replicas_per_primary)

    # Starting and stopping ------------------------------------------------------

    def start(self) -> LocalCluster:
        try:
            for index in range(self.size):
                self.nodes.append(self._start_node(index))
            self._create()
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, index: int) -> RedisServer:
        folder = self.folder / f"node-{index}"
        cluster_args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(folder / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-port", str(free_port()),
            *FAST_SYNC_ARGS,
        ]
        return RedisServer(folder, extra_args=cluster_args).start()

    def _create(self) -> None:
        """Assign the slots and replicas with ``redis-cli --cluster create``."""
        command = [
            self.redis_cli,
            "--cluster", "create",
            *(node.address for node in self.nodes),
            "--cluster-replicas", str(self.replicas_per_primary),
            "--cluster-yes",
        ]
        result = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=READY_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")[-2000:]
            raise ClusterNotReadyError(f"redis-cli --cluster create failed:\n{output}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Topology ---------------------------------------------------------------

    def primaries(self) -> list[RedisServer]:
        """Return the nodes whose role is primary right now."""
        return [node for node in self.nodes if server_role(node) == "master"]

    def replicas(self) -> list[RedisServer]:
        """Return the nodes whose role is replica right now."""
        return [node for node in self.nodes if server_role(node) == "slave"]

    def node_at(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node of this cluster listens on port {port}")

    def primary_of(self, key: str | bytes) -> RedisServer:
        """Return the node that serves the hash slot of ``key`` as primary."""
        with self.nodes[0].client(socket_timeout=CLIENT_TIMEOUT_S) as client:
            slot = client.cluster("KEYSLOT", key)
            for start, end, primary, *_replicas in client.cluster("SLOTS"):
                if start <= slot <= end:
                    return self.node_at(int(primary[1]))
        raise KeyError(f"slot {slot} of {key!r} is not served by any node")

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        """Return the replicas that replicate ``primary`` right now."""
        attached = []
        for node in self.replicas():
            info = replication_info(node)
            if int(info.get("master_port", -1)) == primary.port:
                attached.append(node)
        return attached

    @property
    def url(self) -> str:
        """A redis:// URL of one node; a cluster client finds the others from it."""
        return f"redis://{self.nodes[0].address}"

    @property
    def startup_nodes(self) -> list[redis.cluster.ClusterNode]:
        return [redis.cluster.ClusterNode(LOCALHOST, node.port) for node in self.nodes]

    def client(self, **options: object) -> redis.cluster.RedisCluster:
        options.setdefault("socket_timeout", CLIENT_TIMEOUT_S)
        return redis.cluster.RedisCluster(startup_nodes=self.startup_nodes, **options)

    def async_client(self, **options: object) -> redis.asyncio.cluster.RedisCluster:
        options.setdefault("socket_timeout", CLIENT_TIMEOUT_S)
        startup_nodes = [
            redis.asyncio.cluster.ClusterNode(LOCALHOST, node.port)
            for node in self.nodes
        ]
        return redis.asyncio.cluster.RedisCluster(
            startup_nodes=startup_nodes, **options
        )

    def load_library(self, source: str) -> None:
        """FUNCTION LOAD REPLACE ``source`` on every current primary."""
        for node in self.primaries():
            with node.client(socket_timeout=CLIENT_TIMEOUT_S) as client:
                client.function_load(source, replace=True)

    # Health ---------------------------------------------------------------

    def wait_until_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until every node is healthy and all of them agree on the slot map."""
        wait_for(self._readiness_problem, timeout_s, "the cluster did not become ready")

    def _readiness_problem(self) -> str | None:
        """Return why the cluster is not ready yet, or None when it is."""
        slot_maps = set()
        primary_count = 0
        for node in self.nodes:
            try:
                problem, slot_map, is_primary = self._node_problem(node)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                return f"{node.address} is unreachable: {exc}"
            if problem is not None:
                return f"{node.address}: {problem}"
            slot_maps.add(slot_map)
            primary_count += is_primary
        if primary_count != self.primary_count:
            return f"{primary_count} primaries instead of {self.primary_count}"
        if len(slot_maps) != 1:
            return "the nodes disagree on which primary serves which slots"
        return None

    def _node_problem(self, node: RedisServer) -> tuple[str | None, tuple, bool]:
        with node.client(socket_timeout=CLIENT_TIMEOUT_S) as client:
            info = client.cluster("INFO")
            if info.get("cluster_state") != "ok":
                return f"cluster_state is {info.get('cluster_state')}", (), False
            if int(info.get("cluster_known_nodes", 0)) != self.size:
                return f"knows {info.get('cluster_known_nodes')} nodes", (), False
            for address, peer in client.cluster("NODES").items():
                flags = peer["flags"]
                if any(bad in flags for bad in ("fail", "handshake", "noaddr")):
                    return f"reports {address} with flags {flags}", (), False
                if not peer["connected"]:
                    return f"is not connected to {address}", (), False
            slot_map = slot_map_of(client)
            replication = client.info("replication")
        for _start, _end, _primary, replicas in slot_map:
            # CLUSTER SLOTS leaves out a replica until this node has received
            # the replica's replication offset in a cluster bus message, and a
            # client built before that never reads from the replica.
            if len(replicas) != self.replicas_per_primary:
                return f"lists {len(replicas)} replicas of a shard", slot_map, False
        if replication["role"] == "slave":
            if replication.get("master_link_status") != "up":
                return "its link to the primary is down", slot_map, False
            if int(replication.get("master_sync_in_progress", 0)) != 0:
                return "it is still syncing from the primary", slot_map, False
            return None, slot_map, False
        replica_count = int(replication.get("connected_slaves", 0))
        if replica_count != self.replicas_per_primary:
            return f"{replica_count} replicas are attached", slot_map, True
        return None, slot_map, True

    # Failover -------------------------------------------------------------

    def failover(
        self, replica: RedisServer, timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        """Promote ``replica`` with a manual CLUSTER FAILOVER and wait until all agree.

        A manual failover without FORCE pauses the old primary's clients until
        the replica has caught up with every write, so no acknowledged write
        is lost. The primaries refuse to vote twice for replicas of one
        primary within two node timeouts, and a manual failover that gets no
        votes gives up after 5 s, so the request is repeated until it succeeds.
        """
        deadline = time.monotonic() + timeout_s
        attempt_s = 2 * self.node_timeout_ms / 1000 + 1

        def promotion_problem() -> str | None:
            if server_role(replica) != "master":
                return f"{replica.address} is still a replica"
            return self._readiness_problem()

        while True:
            with replica.client(socket_timeout=CLIENT_TIMEOUT_S) as client:
                client.cluster("FAILOVER")
            remaining_s = deadline - time.monotonic()
            try:
                wait_for(
                    promotion_problem,
                    min(attempt_s, remaining_s),
                    f"{replica.address} was not promoted",
                )
                return
            except ClusterNotReadyError:
                if time.monotonic() >= deadline or server_role(replica) == "master":
                    raise


    def crash(self, node: RedisServer) -> None:
        """Kill ``node`` with SIGKILL, as a crash or power loss would end it."""
        assert node.process is not None
        node.process.kill()
        node.process.wait(timeout=CLIENT_TIMEOUT_S)

    def wait_until_promoted(
        self, replica: RedisServer, timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        """Wait until ``replica`` has taken over its failed primary's slots."""

        def promotion_problem() -> str | None:
            if server_role(replica) != "master":
                return f"{replica.address} is still a replica"
            with replica.client(socket_timeout=CLIENT_TIMEOUT_S) as client:
                state = client.cluster("INFO").get("cluster_state")
            if state != "ok":
                return f"cluster_state is {state}"
            return None

        wait_for(promotion_problem, timeout_s, f"{replica.address} was not promoted")


class PrimaryWithReplica:
    """A plain (non-cluster) primary with one replica attached by --replicaof."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.primary = RedisServer(self.folder / "primary", extra_args=FAST_SYNC_ARGS)
        self.replica = RedisServer(
            self.folder / "replica",
            extra_args=["--replicaof", LOCALHOST, str(self.primary.port)],
        )

    def start(self) -> PrimaryWithReplica:
        try:
            self.primary.start()
            self.replica.start()
            self.wait_until_linked()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_linked(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        def link_problem() -> str | None:
            info = replication_info(self.replica)
            if info.get("master_link_status") != "up":
                return "the replica's link to the primary is down"
            if int(info.get("master_sync_in_progress", 0)) != 0:
                return "the replica is still syncing"
            return None

        wait_for(link_problem, timeout_s, "the replica did not attach")

    def wait_until_replicated(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the replica has applied every write the primary has made."""
        def lag_problem() -> str | None:
            primary_offset = replication_info(self.primary)["master_repl_offset"]
            replica_offset = replication_info(self.replica)["slave_repl_offset"]
            if replica_offset < primary_offset:
                return (
                    f"replica offset {replica_offset} is behind primary offset "
                    f"{primary_offset}"
                )
            return None

        wait_for(lag_problem, timeout_s, "the replica did not catch up")

    def stop(self) -> None:
        self.replica.stop()
        self.primary.stop()

    def __enter__(self) -> PrimaryWithReplica:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class LimiterWorkload:
    """Worker threads that acquire and release slots while a test changes the servers.

    Each worker has its own limiter from ``make_limiter``. It takes a slot of
    a random key, keeps it for a few ms and releases it. While it has the
    slot it counts itself in ``holding[key]``. It enters the count after the
    acquire returns and leaves it before the release is sent, so the count
    never exceeds the live slots in Redis, and a count above ``max_slots``
    means Redis granted one slot too many. LimiterUnavailableError is counted
    and the call retried. Any other exception is recorded and ends that
    worker. The first
    ``waiting_workers`` workers acquire with ``wait=wait_s``, so waiting in
    line (sharded pub/sub) is part of the load. ``count_reader(key)``, when
    given, is polled from one more thread and its replies are checked too.
    """

    def __init__(
        self,
        make_limiter: Callable[[], ConcurrentRunsLimiter],
        keys: Sequence[str],
        max_slots: int,
        workers: int = 8,
        hold_s: float = 0.002,
        waiting_workers: int = 0,
        wait_s: float = 0.5,
        count_reader: Callable[[str], int] | None = None,
    ) -> None:
        self.keys = list(keys)
        self.max_slots = max_slots
        self.hold_s = hold_s
        self.wait_s = wait_s
        self.count_reader = count_reader
        self.limiters = [make_limiter() for _ in range(workers)]
        self.waiting_workers = waiting_workers
        self.grants = [0] * workers
        self.holding: collections.Counter[str] = collections.Counter()
        self.max_holding = 0
        self.max_count_read = 0
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.unavailable_errors = 0
        self.lost_releases = 0
        self.count_reads = 0
        self._mark = [0] * workers
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> LimiterWorkload:
        for index in range(len(self.limiters)):
            thread = threading.Thread(
                target=self._work, args=(index,), name=f"workload-{index}", daemon=True
            )
            self._threads.append(thread)
        if self.count_reader is not None:
            reader = threading.Thread(
                target=self._read_counts, name="count-reader", daemon=True
            )
            self._threads.append(reader)
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=READY_TIMEOUT_S)
        for limiter in self.limiters:
            limiter.close()

    def __enter__(self) -> LimiterWorkload:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def mark(self) -> None:
        """Remember each worker's grants so far, for ``wait_for_progress``."""
        with self._lock:
            self._mark = list(self.grants)

    def wait_for_progress(
        self, grants_per_worker: int, timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        """Wait until every worker got ``grants_per_worker`` slots since ``mark()``.

        Returns early when a worker failed, so that the test reports its error.
        """

        def progress_problem() -> str | None:
            with self._lock:
                if self.errors:
                    return None
                behind = [
                    index
                    for index, (now, before) in enumerate(zip(self.grants, self._mark))
                    if now - before < grants_per_worker
                ]
            if behind:
                return f"workers {behind} got fewer than {grants_per_worker} slots"
            return None

        wait_for(progress_problem, timeout_s, "the workers made no progress")

    def summary(self) -> str:
        return (
            f"grants={sum(self.grants)} unavailable={self.unavailable_errors} "
            f"lost_releases={self.lost_releases} max_holding={self.max_holding} "
            f"max_count_read={self.max_count_read} errors={self.errors[:3]}"
        )

    def _work(self, index: int) -> None:
        limiter = self.limiters[index]
        wait = self.wait_s if index < self.waiting_workers else None
        chooser = random.Random(index)
        while not self._stop.is_set():
            key = chooser.choice(self.keys)
            try:
                token = limiter.acquire(key, self.max_slots, wait=wait)
            except LimiterUnavailableError:
                self._count_unavailable()
                continue
            except Exception as exc:  # recorded for the test to report
                self._record_error(f"acquire: {exc!r}")
                return
            if token is None:
                time.sleep(0.001)
                continue
            self._enter(key, index)
            time.sleep(chooser.uniform(0, 2 * self.hold_s))
            self._leave(key)
            if not self._release(limiter, key, token):
                return

    def _release(self, limiter: ConcurrentRunsLimiter, key: str, token: str) -> bool:
        """Release until Redis replies; return False when the worker must stop."""
        while True:
            try:
                released = limiter.release(key, token)
            except LimiterUnavailableError:
                self._count_unavailable()
                continue
            except Exception as exc:  # recorded for the test to report
                self._record_error(f"release: {exc!r}")
                return False
            if not released:
                with self._lock:
                    self.lost_releases += 1
            return True

    def _enter(self, key: str, index: int) -> None:
        with self._lock:
            self.grants[index] += 1
            self.holding[key] += 1
            holders = self.holding[key]
            self.max_holding = max(self.max_holding, holders)
            if holders > self.max_slots:
                self.violations.append(f"{holders} workers held {key!r} at once")

    def _leave(self, key: str) -> None:
        with self._lock:
            self.holding[key] -= 1

    def _count_unavailable(self) -> None:
        with self._lock:
            self.unavailable_errors += 1
        time.sleep(0.01)

    def _record_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _read_counts(self) -> None:
        assert self.count_reader is not None
        while not self._stop.is_set():
            key = random.choice(self.keys)
            try:
                count = self.count_reader(key)
            except LimiterUnavailableError:
                self._count_unavailable()
                continue
            except Exception as exc:  # recorded for the test to report
                self._record_error(f"count read: {exc!r}")
                return
            with self._lock:
                self.count_reads += 1
                self.max_count_read = max(self.max_count_read, count)
                if count > self.max_slots:
                    self.violations.append(f"runs_count of {key!r} read {count}")
            time.sleep(0.005)


def _require_binaries() -> None:
    if shutil.which("redis-cli") is None or redis_server_binary() is None:
        pytest.fail(NO_REDIS_CLI_MESSAGE, pytrace=False)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-primary, 3-replica cluster shared by the tests of one module.

    A test that fails a shard over must leave the cluster ready again: three
    primaries, each with a replica, though the roles may have swapped.
    """
    _require_binaries()
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def primary_with_replica(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrimaryWithReplica]:
    """A plain primary with one replica, shared by the tests of one module."""
    _require_binaries()
    with PrimaryWithReplica(tmp_path_factory.mktemp("replication")) as pair:
        yield pair
