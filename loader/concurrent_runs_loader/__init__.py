"""Deploy the concurrent_runs Redis library, and inspect limit keys.

Deploy scripts can use the same code as the ``concurrent-runs`` command::

    from concurrent_runs_loader import deploy_library

    result = deploy_library("redis://redis.internal:6379/0")
    for node in result.nodes:
        print(node.describe())
    if not result.ok:
        raise SystemExit(1)
"""

from .deploy import (
    DEFAULT_REPLICA_TIMEOUT_S,
    DeployResult,
    LoadPlan,
    NodeLoadResult,
    NodeStatus,
    deploy_library,
    library_status,
    plan_load,
)
from .nodes import (
    PRIMARY,
    REPLICA,
    UNKNOWN_VERSION,
    LoaderError,
    Node,
    Topology,
    check_redis_version,
)
from .slots import Holder, SlotAdmin

__all__ = [
    "DEFAULT_REPLICA_TIMEOUT_S",
    "PRIMARY",
    "REPLICA",
    "UNKNOWN_VERSION",
    "DeployResult",
    "Holder",
    "LoadPlan",
    "LoaderError",
    "Node",
    "NodeLoadResult",
    "NodeStatus",
    "SlotAdmin",
    "Topology",
    "check_redis_version",
    "deploy_library",
    "library_status",
    "plan_load",
]
