"""The Redis servers behind a URL: one server, a primary with replicas, or a cluster.

A URL names one server. ``Topology.discover`` queries that server for what it is
part of: with cluster mode on, CLUSTER NODES lists every primary and replica; a
plain primary lists its replicas in INFO replication. A lone server is simply a
topology of one node, so the deploy code treats every case alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, TypeVar

import redis
from redis.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from concurrent_runs._core import as_text
from concurrent_runs.errors import ConcurrentRunsError
from concurrent_runs.library import FN_VERSION, LIBRARY_NAME

logger = logging.getLogger("concurrent_runs_loader")

PRIMARY = "primary"
REPLICA = "replica"

# Redis Functions (FUNCTION LOAD, FCALL) first shipped in Redis 7.0.
MIN_REDIS_VERSION = (7, 0)

CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 10.0

# The version reported for a library named concurrent_runs that has no
# runs_version function, so its version cannot be read.
UNKNOWN_VERSION = "unknown"

# Flags of CLUSTER NODES entries that have no usable address yet.
_UNREACHABLE_FLAGS = frozenset({"noaddr", "handshake"})

T = TypeVar("T")


class LoaderError(ConcurrentRunsError):
    """A Redis server could not be reached, logged into or used by the loader."""


@dataclass(frozen=True)
class Node:
    """One Redis server of a topology.

    ``address`` is ``host:port``, or the socket path for a Unix socket.
    ``primary`` is the address of a replica's primary, and None for a primary.
    """

    address: str
    role: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    primary: str | None = None


# Pure helpers --------------------------------------------------------------


def parse_redis_version(text: str) -> tuple[int, ...]:
    """Split a redis_version such as '7.0.15' into integers; ValueError if invalid."""
    parts = text.strip().split(".")
    if not parts or not all(part.isdigit() for part in parts):
        raise ValueError(f"invalid Redis version {text!r}")
    return tuple(int(part) for part in parts)


def check_redis_version(version: str, address: str) -> None:
    """Raise LoaderError unless the Redis at ``address`` is 7.0 or newer.

    An unparseable version passes: a server that lacks Redis Functions still
    fails plainly at FUNCTION LOAD.
    """
    try:
        parsed = parse_redis_version(version)
    except ValueError:
        logger.warning(
            "Redis at %s reports an unparseable version %r", address, version
        )
        return
    if parsed[:2] < MIN_REDIS_VERSION:
        minimum = ".".join(str(part) for part in MIN_REDIS_VERSION)
        raise LoaderError(
            f"Could not use Redis at {address}: it is version {version}, but Redis "
            f"Functions need Redis {minimum} or newer; upgrade the server"
        )


def describe_redis_error(action: str, address: str, exc: Exception) -> str:
    """Return a one-line message for an error raised while trying to ``action``."""
    if isinstance(exc, AuthenticationError):
        return (
            f"Could not {action}: Redis at {address} rejected the login ({exc}); "
            "check the user name and password in --url"
        )
    if isinstance(exc, RedisTimeoutError):
        return f"Could not {action}: Redis at {address} did not reply in time ({exc})"
    if isinstance(exc, RedisConnectionError):
        return f"Could not {action}: Redis at {address} is unreachable ({exc})"
    if isinstance(exc, NoPermissionError):
        return (
            f"Could not {action}: the Redis user lacks a permission on {address} "
            f"({exc}); see 'Deploying the library' in the README for the ACL it needs"
        )
    return f"Could not {action}: Redis at {address} replied with an error ({exc})"


def call_redis(action: str, address: str, call: Callable[[], T]) -> T:
    """Run ``call``, turning a redis-py error into a LoaderError naming ``action``."""
    try:
        return call()
    except RedisError as exc:
        raise LoaderError(describe_redis_error(action, address, exc)) from exc


def is_function_missing(exc: RedisError) -> bool:
    return "function not found" in str(exc).lower()


def _sort_key(node: Node) -> tuple[str, int]:
    return (node.host or node.path or "", node.port or 0)


def order_nodes(nodes: Iterable[Node]) -> list[Node]:
    """Order nodes by address, each primary followed by its replicas."""
    nodes = list(nodes)
    primaries = sorted((node for node in nodes if node.role == PRIMARY), key=_sort_key)
    known = {node.address for node in primaries}
    ordered = []
    for primary in primaries:
        ordered.append(primary)
        replicas = [node for node in nodes if node.primary == primary.address]
        ordered.extend(sorted(replicas, key=_sort_key))
    orphans = [
        node for node in nodes if node.role == REPLICA and node.primary not in known
    ]
    ordered.extend(sorted(orphans, key=_sort_key))
    return ordered


def parse_cluster_nodes(text: str, default_host: str) -> list[Node]:
    """Parse a CLUSTER NODES reply into nodes, skipping those with no address.

    Each line reads ``id host:port@bus-port[,hostname] flags primary-id ...``.
    A node that does not know its own IP yet shows an empty host, which is
    taken to be ``default_host``, the host the URL named.
    """
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, address_field, flags_field, primary_id = fields[:4]
        flags = set(flags_field.split(","))
        if flags & _UNREACHABLE_FLAGS:
            continue
        host, _, port_text = address_field.split("@")[0].rpartition(":")
        if not port_text.isdigit() or int(port_text) == 0:
            continue
        host = host or default_host
        entries.append((node_id, host, int(port_text), flags, primary_id))

    address_of = {node_id: f"{host}:{port}" for node_id, host, port, _, _ in entries}
    nodes = []
    for node_id, host, port, flags, primary_id in entries:
        if "slave" in flags:
            role, primary = REPLICA, address_of.get(primary_id)
        else:
            role, primary = PRIMARY, None
        address = address_of[node_id]
        nodes.append(Node(address, role, host=host, port=port, primary=primary))
    return order_nodes(nodes)


def replicas_from_info(primary: Node, replication: Mapping[str, Any]) -> list[Node]:
    """Return the replicas that INFO replication of a plain primary lists."""
    replicas = []
    for field, value in replication.items():
        if not (field.startswith("slave") and isinstance(value, dict)):
            continue
        host, port = str(value["ip"]), int(value["port"])
        address = f"{host}:{port}"
        replicas.append(
            Node(address, REPLICA, host=host, port=port, primary=primary.address)
        )
    return replicas


# Connections ---------------------------------------------------------------


def parse_settings(url: str) -> dict[str, Any]:
    """Return redis-py connection settings for ``url``; LoaderError when invalid."""
    try:
        settings = parse_url(url)
    except ValueError as exc:
        raise LoaderError(f"Invalid Redis URL in --url: {exc}") from None
    settings.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
    settings.setdefault("socket_timeout", SOCKET_TIMEOUT_S)
    return settings


def entry_node(settings: Mapping[str, Any]) -> Node:
    """Return the node that the URL names, role still unknown (PRIMARY)."""
    if settings.get("connection_class") is UnixDomainSocketConnection:
        path = settings.get("path", "")
        return Node(path, PRIMARY, path=path)
    host = settings.get("host", "localhost")
    port = int(settings.get("port", 6379))
    return Node(f"{host}:{port}", PRIMARY, host=host, port=port)


def open_client(settings: Mapping[str, Any], node: Node) -> redis.Redis:
    """Open a client of ``node`` with the credentials and options of the URL.

    The other nodes of a topology are reached over TCP even when the URL
    named a Unix socket, so only the entry node keeps the socket path.
    """
    options = dict(settings)
    if node.path is None:
        options.pop("path", None)
        if options.get("connection_class") is UnixDomainSocketConnection:
            del options["connection_class"]
        options.update(host=node.host, port=node.port)
    pool = redis.ConnectionPool(**options)
    return redis.Redis.from_pool(pool)


def read_library_version(client: redis.Redis) -> str | None:
    """Return the server's library version, None when it has no library.

    A library named concurrent_runs without a runs_version function (a
    foreign or broken one) reports UNKNOWN_VERSION.
    """
    try:
        return as_text(client.fcall_ro(FN_VERSION, 0))
    except RedisError as exc:
        if not is_function_missing(exc):
            raise
    if client.function_list(library=LIBRARY_NAME):
        return UNKNOWN_VERSION
    return None


def read_redis_version(client: redis.Redis) -> str:
    return str(client.info("server")["redis_version"])


class Topology:
    """The nodes behind a URL and a client for each, opened on first use."""

    def __init__(
        self,
        settings: Mapping[str, Any],
        nodes: list[Node],
        cluster: bool,
        clients: dict[str, redis.Redis] | None = None,
    ) -> None:
        self.settings = dict(settings)
        self.nodes = nodes
        self.cluster = cluster
        self._clients: dict[str, redis.Redis] = dict(clients or {})

    @classmethod
    def discover(cls, url: str) -> Topology:
        """Connect to the server at ``url`` and list the nodes it belongs to.

        Raises LoaderError when that server is unreachable, rejects the login
        or the commands, or is older than Redis 7.0.
        """
        settings = parse_settings(url)
        entry = entry_node(settings)
        client = open_client(settings, entry)
        try:
            topology = cls._discover_from(settings, entry, client)
        except BaseException:
            client.close()
            raise
        if topology.cluster:
            client.close()
        return topology

    @classmethod
    def _discover_from(
        cls, settings: Mapping[str, Any], entry: Node, client: redis.Redis
    ) -> Topology:
        address = entry.address
        try:
            version = read_redis_version(client)
        except AuthenticationError as exc:
            if settings.get("password") is None:
                # redis-py's message for this case is about HELLO or NOAUTH,
                # which does not tell the user what to change.
                raise LoaderError(
                    f"Could not connect: Redis at {address} requires a login, but "
                    "--url has no password; use redis://USER:PASSWORD@HOST:PORT/DB"
                ) from exc
            raise LoaderError(describe_redis_error("connect", address, exc)) from exc
        except RedisError as exc:
            raise LoaderError(describe_redis_error("connect", address, exc)) from exc
        check_redis_version(version, address)
        cluster_info = call_redis(
            "read INFO cluster", address, lambda: client.info("cluster")
        )

        if int(cluster_info.get("cluster_enabled", 0)) == 1:
            raw = call_redis(
                "list the cluster nodes",
                address,
                lambda: client.execute_command("CLUSTER", "NODES"),
            )
            nodes = parse_cluster_nodes(as_text(raw), entry.host or "127.0.0.1")
            if not nodes:
                raise LoaderError(
                    f"Could not list the cluster nodes: {address} knows none"
                )
            logger.debug("%s is a node of a cluster of %d nodes", address, len(nodes))
            return cls(settings, nodes, cluster=True)

        replication = call_redis(
            "read INFO replication", address, lambda: client.info("replication")
        )
        if replication.get("role") == "slave":
            primary_host = replication.get("master_host")
            primary = f"{primary_host}:{replication.get('master_port')}"
            node = Node(
                address,
                REPLICA,
                host=entry.host,
                port=entry.port,
                path=entry.path,
                primary=primary,
            )
            return cls(settings, [node], cluster=False, clients={address: client})
        nodes = order_nodes([entry, *replicas_from_info(entry, replication)])
        logger.debug("%s is a primary with %d replicas", address, len(nodes) - 1)
        return cls(settings, nodes, cluster=False, clients={address: client})

    def primaries(self) -> list[Node]:
        return [node for node in self.nodes if node.role == PRIMARY]

    def replicas(self) -> list[Node]:
        return [node for node in self.nodes if node.role == REPLICA]

    def client(self, node: Node) -> redis.Redis:
        """Return the client of ``node``, opening it on first use."""
        client = self._clients.get(node.address)
        if client is None:
            client = open_client(self.settings, node)
            self._clients[node.address] = client
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
