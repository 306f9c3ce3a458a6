"""`flyfs status --cluster HOST:PORT [--json]`: nodes, targets and chains as the manager sees them.

The JSON output is for scripts; its keys are stable (documented in README.md):
{"routing_version": int,
 "nodes":   [{"id", "type", "address", "pid", "hostname", "alive", "last_heartbeat_ms"}],
 "targets": [{"id", "node", "chain", "state", "local_state", "used_bytes", "total_bytes", "path"}],
 "chains":  [{"id", "version", "targets": [{"id", "state"}]}],
 "chain_tables": [{"id", "version", "chains": [int]}]}
"""
from __future__ import annotations

import argparse
import json
import sys

import grpc

from ..proto import common_pb2, mgmtd_pb2, mgmtd_pb2_grpc


def _state(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)


def fetch(address: str, timeout: float = 5.0) -> dict:
    """The routing info of the cluster at `address`, as the documented dict."""
    address = address.removeprefix("flyfs://")
    with grpc.insecure_channel(address) as channel:
        reply = mgmtd_pb2_grpc.MgmtdStub(channel).GetRoutingInfo(
            mgmtd_pb2.GetRoutingInfoRequest(header=common_pb2.RequestHeader()), timeout=timeout)
    if reply.status.code:
        raise RuntimeError(reply.status.message)
    info = reply.info
    return {
        "routing_version": info.version,
        "nodes": [{"id": n.node_id, "type": _state(mgmtd_pb2.NodeType, n.type, "NODE_").lower(),
                   "address": n.address, "pid": n.pid, "hostname": n.hostname, "alive": n.alive,
                   "last_heartbeat_ms": n.last_heartbeat_age_ms} for n in info.nodes],
        "targets": [{"id": t.target_id, "node": t.node_id, "chain": t.chain_id,
                     "state": _state(mgmtd_pb2.PublicTargetState, t.public_state, "PUBLIC_"),
                     "local_state": _state(mgmtd_pb2.LocalTargetState, t.local_state, "LOCAL_"),
                     "used_bytes": t.used_bytes, "total_bytes": t.total_bytes, "path": t.data_path}
                    for t in info.targets],
        "chains": [{"id": c.chain_id, "version": c.version,
                    "targets": [{"id": t.target_id,
                                 "state": _state(mgmtd_pb2.PublicTargetState, t.public_state, "PUBLIC_")}
                                for t in c.targets]} for c in info.chains],
        "chain_tables": [{"id": t.table_id, "version": t.version, "chains": list(t.chain_ids)}
                         for t in info.chain_tables],
    }


def render(st: dict) -> str:
    out = [f"routing version {st['routing_version']}", "", "NODES"]
    out.append(f"  {'id':>4}  {'type':<8} {'address':<22} {'pid':>7}  {'state':<6} last heartbeat")
    for n in st["nodes"]:
        hb = f"{n['last_heartbeat_ms'] / 1000:.1f} s ago" if n["last_heartbeat_ms"] >= 0 else "-"
        out.append(f"  {n['id']:>4}  {n['type']:<8} {n['address']:<22} {n['pid']:>7}  "
                   f"{'up' if n['alive'] else 'DOWN':<6} {hb}")
    out += ["", "TARGETS", f"  {'id':>4}  {'node':>4}  {'chain':>5}  {'state':<8} {'used':>12}"]
    for t in st["targets"]:
        out.append(f"  {t['id']:>4}  {t['node']:>4}  {t['chain']:>5}  {t['state']:<8} {t['used_bytes']:>12,}")
    out += ["", "CHAINS"]
    for c in st["chains"]:
        members = " -> ".join(f"{t['id']}:{t['state']}" for t in c["targets"])
        out.append(f"  chain {c['id']} v{c['version']}: {members}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flyfs status", description="Show the nodes, targets and chains of a cluster.",
                                 epilog="example: flyfs status --cluster 127.0.0.1:8000 --json")
    ap.add_argument("--cluster", required=True, help="the manager's HOST:PORT")
    ap.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    args = ap.parse_args(argv)
    try:
        st = fetch(args.cluster)
    except grpc.RpcError as e:
        print(f"flyfs status: cannot reach mgmtd at {args.cluster}: {e.code().name}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"flyfs status: {e}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=1) if args.json else render(st))
    return 0
