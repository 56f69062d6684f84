"""Deploy the packaged library onto Redis, and report what each server holds.

``deploy_library`` loads the packaged Lua source on every primary behind a URL
(one server, or every primary of a cluster) and then checks that each replica
received it by replication. ``library_status`` reads the Redis and library
version of every node. Both return plain dataclasses; the ``concurrent-runs``
command only prints them.

Version rules, applied on each primary:

- no library: install it;
- an older version of the same major version: upgrade it;
- the same version: leave it, unless ``force`` is set, which loads it again;
- a newer version (a downgrade), an older major version (clients of the old
  major version stop working once it is replaced) or a library whose version
  cannot be read: rejected unless ``force``.

Upgrades use FUNCTION LOAD REPLACE, which swaps the whole library atomically,
so a running client sees either the old library or the new one.
"""

from __future__ import annotations

import logging
import time as mod_time
from dataclasses import asdict, dataclass

from redis.exceptions import RedisError

from concurrent_runs.library import (
    LIBRARY_NAME,
    library_source,
    packaged_version,
    parse_version,
)

from .nodes import (
    REPLICA,
    LoaderError,
    Node,
    Topology,
    check_redis_version,
    describe_redis_error,
    read_library_version,
    read_redis_version,
)

logger = logging.getLogger("concurrent_runs_loader.deploy")

# How long a replica may take to receive the library from its primary.
DEFAULT_REPLICA_TIMEOUT_S = 5.0
REPLICA_POLL_S = 0.05

# Changes that plan_load finds between the installed and the packaged library.
INSTALL = "install"
UPGRADE = "upgrade"
UNCHANGED = "unchanged"
DOWNGRADE = "downgrade"
MAJOR_UPGRADE = "major upgrade"
UNRECOGNISED = "unrecognised"

# Outcomes that are not a change of version.
REJECTED = "rejected"
FAILED = "failed"
REPLICATED = "replicated"
NOT_CHECKED = "not checked"


@dataclass(frozen=True)
class LoadPlan:
    """The change that loading the packaged library makes on one primary."""

    change: str
    installed: str | None
    packaged: str

    @property
    def needs_force(self) -> bool:
        return self.change in (DOWNGRADE, MAJOR_UPGRADE, UNRECOGNISED)

    def rejection(self) -> str:
        """Return why the change needs ``--force``; only for needs_force plans."""
        if self.change == DOWNGRADE:
            return (
                f"the server has {self.installed}, newer than this package's "
                f"{self.packaged}; pass --force to downgrade it"
            )
        if self.change == MAJOR_UPGRADE:
            old_major = self.installed.split(".")[0] if self.installed else "?"
            return (
                f"upgrading {self.installed} to {self.packaged} changes the major "
                f"version, and clients built for version {old_major} stop working; "
                "upgrade those clients, then pass --force"
            )
        return (
            f"the server has a {LIBRARY_NAME} library of unrecognised version "
            f"{self.installed!r}; pass --force to replace it"
        )


def plan_load(installed: str | None, packaged: str) -> LoadPlan:
    """Compare the installed library version with the packaged one."""
    if installed is None:
        return LoadPlan(INSTALL, installed, packaged)
    try:
        installed_parts = parse_version(installed)
    except ValueError:
        return LoadPlan(UNRECOGNISED, installed, packaged)
    packaged_parts = parse_version(packaged)

    if installed_parts == packaged_parts:
        change = UNCHANGED
    elif installed_parts > packaged_parts:
        change = DOWNGRADE
    elif installed_parts[0] < packaged_parts[0]:
        change = MAJOR_UPGRADE
    else:
        change = UPGRADE
    return LoadPlan(change, installed, packaged)


# What loading did, per node ------------------------------------------------

# The words a report uses for each change: (done, dry run).
_CHANGE_WORDS = {
    INSTALL: ("installed", "would install"),
    UPGRADE: ("upgraded", "would upgrade"),
    MAJOR_UPGRADE: ("upgraded", "would upgrade"),
    DOWNGRADE: ("downgraded", "would downgrade"),
    UNRECOGNISED: ("replaced", "would replace"),
    UNCHANGED: ("reloaded", "would reload"),
}


@dataclass(frozen=True)
class NodeLoadResult:
    """What ``deploy_library`` did on one node.

    ``outcome`` is a past-tense verb such as ``installed`` or ``upgraded``
    (``would install`` and so on in a dry run), ``unchanged``, ``replicated``
    for a replica that has its primary's library, ``not checked`` for a
    replica whose primary failed, or ``rejected`` or ``failed``, with the
    reason in ``error``. ``before`` and ``after`` are library versions, None
    where there is no library.
    """

    address: str
    role: str
    outcome: str
    before: str | None = None
    after: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome not in (REJECTED, FAILED)

    def describe(self) -> str:
        """Return the report line, e.g. ``127.0.0.1:6379 primary: installed 1.1.0``."""
        return f"{self.address} {self.role}: {self._detail()}"

    def _detail(self) -> str:
        if self.outcome in (REJECTED, FAILED):
            return f"{self.outcome}: {self.error}"
        if self.outcome == NOT_CHECKED:
            return f"not checked: {self.error}"
        if self.outcome == REPLICATED:
            return f"has {self.after or 'no library'}"
        if self.outcome == UNCHANGED:
            return f"unchanged {self.after}"
        if self.before is None or self.before == self.after:
            return f"{self.outcome} {self.after}"
        return f"{self.outcome} {self.before} -> {self.after}"


@dataclass(frozen=True)
class DeployResult:
    """Results of ``deploy_library``: one per node, each primary then its replicas."""

    packaged_version: str
    cluster: bool
    dry_run: bool
    nodes: list[NodeLoadResult]

    @property
    def ok(self) -> bool:
        return all(node.ok for node in self.nodes)

    @property
    def failed(self) -> list[NodeLoadResult]:
        return [node for node in self.nodes if not node.ok]


def deploy_library(
    url: str,
    *,
    force: bool = False,
    dry_run: bool = False,
    replica_timeout_s: float = DEFAULT_REPLICA_TIMEOUT_S,
) -> DeployResult:
    """Load the packaged library on every primary behind ``url``, then check replicas.

    ``url`` may name a plain server or any node of a cluster. ``force``
    allows a downgrade, a major-version change or replacing an unrecognised
    library, and reloads an unchanged version. ``dry_run`` changes nothing and
    reports what would be done. Replicas get ``replica_timeout_s`` seconds to
    receive the library; 0 skips that check.

    A node that fails does not stop the others, and its result gives the reason. Raises
    LoaderError when the server at ``url`` itself is unreachable, rejects the
    login, is older than Redis 7.0, or is a replica outside a cluster.
    """
    source = library_source()
    packaged = packaged_version()

    with Topology.discover(url) as topology:
        if not topology.cluster and not topology.primaries():
            replica = topology.nodes[0]
            raise LoaderError(
                f"Could not load the library on {replica.address}: it is a replica of "
                f"{replica.primary}, and replicas receive functions from their "
                "primary; point --url at the primary"
            )
        results: dict[str, NodeLoadResult] = {}
        for node in topology.primaries():
            results[node.address] = _load_on_primary(
                topology, node, source, packaged, force, dry_run
            )
        results.update(
            _check_replicas(topology, results, dry_run, replica_timeout_s)
        )
        ordered = [results[node.address] for node in topology.nodes]
    return DeployResult(packaged, topology.cluster, dry_run, ordered)


def _load_on_primary(
    topology: Topology,
    node: Node,
    source: str,
    packaged: str,
    force: bool,
    dry_run: bool,
) -> NodeLoadResult:
    client = topology.client(node)
    try:
        check_redis_version(read_redis_version(client), node.address)
        plan = plan_load(read_library_version(client), packaged)
    except RedisError as exc:
        error = describe_redis_error("read the library version", node.address, exc)
        return NodeLoadResult(node.address, node.role, FAILED, error=error)
    except LoaderError as exc:
        return NodeLoadResult(node.address, node.role, FAILED, error=str(exc))

    before = plan.installed
    if plan.needs_force and not force:
        return NodeLoadResult(
            node.address, node.role, REJECTED, before, before, plan.rejection()
        )
    if plan.change == UNCHANGED and not force:
        return NodeLoadResult(node.address, node.role, UNCHANGED, before, before)
    done_word, dry_run_word = _CHANGE_WORDS[plan.change]
    if dry_run:
        return NodeLoadResult(node.address, node.role, dry_run_word, before, packaged)

    try:
        # Without REPLACE, a library that another client loaded since the
        # version was read makes the load fail instead of being overwritten.
        client.function_load(source, replace=before is not None)
        after = read_library_version(client)
    except RedisError as exc:
        if "already exists" in str(exc):
            error = "another client loaded the library meanwhile; run load again"
        else:
            error = describe_redis_error("load the library", node.address, exc)
        return NodeLoadResult(node.address, node.role, FAILED, before, before, error)
    if after != packaged:
        error = f"the server reports version {after} after loading {packaged}"
        return NodeLoadResult(node.address, node.role, FAILED, before, after, error)
    result = NodeLoadResult(node.address, node.role, done_word, before, after)
    logger.info("%s", result.describe())
    return result


def _check_replicas(
    topology: Topology,
    primary_results: dict[str, NodeLoadResult],
    dry_run: bool,
    timeout_s: float,
) -> dict[str, NodeLoadResult]:
    """Check that each replica reports the library version of its primary.

    All replicas are polled in turns until each has the version or
    ``timeout_s`` has passed, so the wait does not add up over replicas. In a
    dry run, or with ``timeout_s`` 0, each replica's version is only read.
    """
    results: dict[str, NodeLoadResult] = {}
    pending: dict[str, tuple[Node, str | None]] = {}
    for node in topology.replicas():
        primary = primary_results.get(node.primary or "")
        if primary is None or not primary.ok:
            state = "is not a known primary" if primary is None else "was not loaded"
            reason = f"its primary {node.primary} {state}"
            results[node.address] = NodeLoadResult(
                node.address, REPLICA, NOT_CHECKED, error=reason
            )
        elif dry_run or timeout_s <= 0:
            results[node.address] = _read_replica(topology, node)
        else:
            pending[node.address] = (node, primary.after)

    deadline = mod_time.monotonic() + timeout_s
    while pending:
        for address, (node, expected) in list(pending.items()):
            seen = _read_replica(topology, node)
            if seen.ok and seen.after == expected:
                results[address] = seen
                del pending[address]
            elif mod_time.monotonic() >= deadline:
                results[address] = _replica_timed_out(seen, expected, timeout_s)
                del pending[address]
        if pending:
            mod_time.sleep(REPLICA_POLL_S)
    return results


def _replica_timed_out(
    seen: NodeLoadResult, expected: str | None, timeout_s: float
) -> NodeLoadResult:
    if not seen.ok:
        return seen
    reason = (
        f"still has {seen.after or 'no library'} after {timeout_s:g} s, "
        f"expected {expected} from its primary"
    )
    return NodeLoadResult(seen.address, REPLICA, FAILED, seen.after, seen.after, reason)


def _read_replica(topology: Topology, node: Node) -> NodeLoadResult:
    try:
        version = read_library_version(topology.client(node))
    except RedisError as exc:
        error = describe_redis_error("read the library version", node.address, exc)
        return NodeLoadResult(node.address, node.role, FAILED, error=error)
    return NodeLoadResult(node.address, node.role, REPLICATED, version, version)


# Status --------------------------------------------------------------------


@dataclass(frozen=True)
class NodeStatus:
    """The Redis and library version of one node; None where it is missing.

    ``error`` is the reason a value could not be read, or None.
    """

    address: str
    role: str
    redis_version: str | None
    library_version: str | None
    packaged_version: str
    error: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def library_status(url: str) -> list[NodeStatus]:
    """Return the status of every node behind ``url``: one node for a lone server.

    Raises LoaderError when the server at ``url`` itself cannot be used; an
    error on another node is reported in that node's ``error``.
    """
    packaged = packaged_version()
    with Topology.discover(url) as topology:
        return [_node_status(topology, node, packaged) for node in topology.nodes]


def _node_status(topology: Topology, node: Node, packaged: str) -> NodeStatus:
    client = topology.client(node)
    redis_version = None
    try:
        redis_version = read_redis_version(client)
        check_redis_version(redis_version, node.address)
        library_version = read_library_version(client)
    except RedisError as exc:
        error = describe_redis_error("read the versions", node.address, exc)
        return NodeStatus(node.address, node.role, redis_version, None, packaged, error)
    except LoaderError as exc:
        error = str(exc)
        return NodeStatus(node.address, node.role, redis_version, None, packaged, error)
    return NodeStatus(node.address, node.role, redis_version, library_version, packaged)

