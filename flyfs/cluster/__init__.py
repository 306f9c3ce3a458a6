"""Cluster management: the chain state machine and layout (pure), the mgmtd
service and its client.

    from flyfs.cluster import Mgmtd, MgmtdClient, next_chain, plan_chains
"""
from .chain_state import (Chain, LocalState, PublicState, head, next_chain, readable_targets, successor,
                          tail, writable, write_targets)
from .layout import LayoutError, plan_chains

__all__ = ["Chain", "LocalState", "PublicState", "head", "tail", "next_chain", "readable_targets",
           "successor", "writable", "write_targets", "LayoutError", "plan_chains",
           "Mgmtd", "MgmtdError", "MgmtdClient", "RoutingInfo"]


def __getattr__(name):
    # The services import grpc; keep `import flyfs.cluster` light for pure users.
    if name in ("Mgmtd", "MgmtdError"):
        from . import mgmtd
        return getattr(mgmtd, name)
    if name in ("MgmtdClient", "RoutingInfo"):
        from . import mgmtd_client
        return getattr(mgmtd_client, name)
    raise AttributeError(f"module 'flyfs.cluster' has no attribute {name!r}")
