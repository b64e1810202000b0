"""The hospital node: the site's agent that pulls runs from the hub (outbound only)."""

from phds_tre.node.agent import NodeAgent, approve_run, reject_run
from phds_tre.node.state import LocalRun, NodeState, StateError

__all__ = ["LocalRun", "NodeAgent", "NodeState", "StateError", "approve_run", "reject_run"]
