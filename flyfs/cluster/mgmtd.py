"""mgmtd, the cluster manager: membership, heartbeats, leases, chains, chain tables
and the versioned routing info, kept in the transactional KV.

Several mgmtd may share one KV; the one holding the lease key is the primary
and answers everything; the others answer NOT_PRIMARY with the primary's
address and take over when the lease expires. The primary keeps the cluster in
memory (loaded from the KV when it becomes primary) and writes every change
through a KV transaction that first checks it still holds the lease, then
applies it in memory, so the KV is always the truth a successor loads.

Heartbeats are not written to the KV (as in 3FS): the primary keeps the
reported local states, usage and last-heartbeat times in memory. A new primary
gives every node one heartbeat timeout to report before declaring it dead, and
until a target reports, its chain holds still (its local state is taken to be
whatever keeps its public state). Chains move one step (`next_chain`) per
reconcile: after a heartbeat that changes something, and on every tick.

Safety rules beyond the chain state machine:
- LOCAL_UPTODATE counts only when the heartbeat's chain version is the chain's
  current one, so a stale "resync done" cannot make a target SERVING.
- A node that registers again (a restarted process) has its targets taken as
  OFFLINE until it heartbeats: whatever it held in flight is gone, so its
  SERVING targets resync (or, if they were the last, become LASTSRV and serve
  again when they report).
- OfflineTarget holds a target OFFLINE until its node registers again.

KV schema (all keys under b"mgmtd/"; ids are fixed-width big-endian so ranges
list in id order; values are serialized mgmtd.proto messages unless noted):

    mgmtd/lease                       JSON {"holder", "address", "expires_ms"}
    mgmtd/cluster_id                  utf-8 cluster id, set on first start
    mgmtd/routing_version             decimal
    mgmtd/next/{node,target,chain}    decimal: the next id to hand out
    mgmtd/node/<u64 node_id>          NodeInfo (node_id, type, address, pid, hostname, registered_ms, data_address)
    mgmtd/target/<u64 target_id>      TargetInfo (target_id, node_id, chain_id, data_path, admin_offline)
    mgmtd/chain/<u64 chain_id>        ChainInfo
    mgmtd/table/<u32 id><u32 version> ChainTableInfo
    mgmtd/idem/<request uuid>         <u64 ms> + serialized reply (retried mutations answer the same)
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
import uuid
from typing import Callable

import grpc

from flyfs.kv import Engine, KVError, open_engine
from flyfs.proto import common_pb2, mgmtd_pb2, mgmtd_pb2_grpc

from .chain_state import Chain, LocalState, PublicState, next_chain
from .layout import LayoutError, plan_chains

log = logging.getLogger("flyfs.mgmtd")

__all__ = ["Mgmtd", "MgmtdError", "NOT_PRIMARY", "main", "chain_to_proto", "chain_from_proto"]

OK = common_pb2.OK
INVALID_ARGUMENT = common_pb2.INVALID_ARGUMENT
NOT_FOUND = common_pb2.NOT_FOUND
INTERNAL = common_pb2.INTERNAL
NOT_PRIMARY = common_pb2.NOT_PRIMARY

P = b"mgmtd/"
K_LEASE = P + b"lease"
K_CLUSTER = P + b"cluster_id"
K_VERSION = P + b"routing_version"
K_NEXT = P + b"next/"
K_NODE = P + b"node/"
K_TARGET = P + b"target/"
K_CHAIN = P + b"chain/"
K_TABLE = P + b"table/"
K_IDEM = P + b"idem/"
IDEM_TTL_S = 3600.0


def _end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


class MgmtdError(Exception):
    """An error answered to the caller as a Status (code from common.proto's StatusCode)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _now_ms() -> int:
    return int(time.time() * 1000)


def chain_to_proto(c: Chain) -> mgmtd_pb2.ChainInfo:
    return mgmtd_pb2.ChainInfo(chain_id=c.chain_id, version=c.version, targets=[
        mgmtd_pb2.ChainTarget(target_id=t, public_state=int(ps)) for t, ps in c.targets])


def chain_from_proto(m: mgmtd_pb2.ChainInfo) -> Chain:
    return Chain(m.chain_id, m.version, tuple((t.target_id, PublicState(t.public_state)) for t in m.targets))


def _check_address(addr: str, what: str = "address", allow_port_0: bool = False) -> None:
    host, sep, port = addr.rpartition(":")
    if not addr or not sep or not host or not port.isdigit() \
            or not (0 if allow_port_0 else 1) <= int(port) < 65536:
        raise MgmtdError(INVALID_ARGUMENT, f"{what} {addr!r} is not HOST:PORT")


def _rpc(reply_cls):
    """Run a request handler: header and primary checks, errors turned into replies."""

    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(self: "Mgmtd", req):
            try:
                self._check_header(req.header)
                if not self.is_primary:
                    where = self._primary_address
                    raise MgmtdError(NOT_PRIMARY, f"this mgmtd ({self.address}) is not the primary; "
                                     + (f"the primary is {where}" if where else "no primary is known yet"))
                return await fn(self, req)
            except MgmtdError as e:
                return self._error_reply(reply_cls, e.code, e.message)
            except KVError as e:
                log.warning("%s failed in the KV: %s", fn.__name__, e)
                return self._error_reply(reply_cls, INTERNAL, f"KV error: {e}")
            except Exception as e:  # keep serving; the caller gets a one-line reason
                log.exception("%s failed", fn.__name__)
                return self._error_reply(reply_cls, INTERNAL, f"internal error in {fn.__name__}: {e}")

        return wrapper

    return deco


class _NotLeaseHolder(Exception):
    pass


class Mgmtd:
    """The cluster manager service.

    `kv` is a KV URL (opened and closed here) or an open Engine (left open).
    `heartbeat_timeout` is the node lease: a node silent that long is dead,
    and a node must stop serving writes after half of it without a successful
    heartbeat. `lease_s` is the primary lease among several mgmtd on one KV.
    `clock` (monotonic seconds) times heartbeats; tests may pass a fake one and
    call `tick()`.
    """

    def __init__(self, kv: str | Engine, listen: str = "127.0.0.1:0", *, cluster_id: str = "flyfs",
                 heartbeat_timeout: float = 10.0, lease_s: float = 5.0, tick_s: float | None = None,
                 mgmtd_id: str | None = None, advertise: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        _check_address(listen, "listen address", allow_port_0=True)
        if heartbeat_timeout <= 0 or lease_s <= 0:
            raise ValueError("heartbeat_timeout and lease_s must be positive")
        self._kv_url = kv if isinstance(kv, str) else None
        self._engine: Engine | None = None if isinstance(kv, str) else kv
        self._listen = listen
        self._advertise = advertise
        self.cluster_id = cluster_id
        self.heartbeat_timeout = heartbeat_timeout
        self.lease_s = lease_s
        self.tick_s = tick_s if tick_s is not None else min(heartbeat_timeout / 4, 1.0)
        self.id = mgmtd_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._server: grpc.aio.Server | None = None
        self.address = ""
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        # Primary state.
        self._primary_until = 0.0
        self._primary_address = ""
        self._loaded = False
        self._nodes: dict[int, mgmtd_pb2.NodeInfo] = {}
        self._targets: dict[int, mgmtd_pb2.TargetInfo] = {}
        self._chains: dict[int, Chain] = {}
        self._tables: dict[int, dict[int, tuple[int, ...]]] = {}
        self._version = 0
        self._next = {"node": 1, "target": 1, "chain": 1}
        # Volatile (heartbeats): never in the KV.
        self._last_seen: dict[int, float] = {}
        self._alive: dict[int, bool] = {}
        self._reports: dict[int, tuple[LocalState, int]] = {}
        self._usage: dict[int, tuple[int, int]] = {}

    # ---- lifecycle --------------------------------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self._loaded and time.monotonic() < self._primary_until

    @property
    def primary_address(self) -> str:
        return self.address if self.is_primary else self._primary_address

    async def start(self) -> None:
        """Open the KV, listen, and try once to become primary before returning."""
        if self._engine is None:
            self._engine = open_engine(self._kv_url)
        try:
            await self._check_cluster_id()
        except BaseException:
            await self._close_engine()
            raise
        # No SO_REUSEPORT: a second server on a taken port must fail, not share it.
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        mgmtd_pb2_grpc.add_MgmtdServicer_to_server(_servicer_for(self), self._server)
        try:
            port = self._server.add_insecure_port(self._listen)
        except RuntimeError as e:
            port = 0
            log.debug("bind failed: %s", e)
        if not port:
            await self._server.stop(None)
            self._server = None
            await self._close_engine()
            raise OSError(f"mgmtd: cannot listen on {self._listen} (address in use or not local)")
        host = self._listen.rpartition(":")[0]
        self.address = self._advertise or f"{host}:{port}"
        await self._server.start()
        try:
            await self._lease_step()
        except Exception as e:
            log.warning("mgmtd %s: first lease attempt failed: %s", self.id, e)
        self._tasks = [asyncio.create_task(self._lease_loop(), name="mgmtd-lease"),
                       asyncio.create_task(self._tick_loop(), name="mgmtd-tick")]
        log.info("mgmtd %s listening on %s (%s)", self.id, self.address,
                 "primary" if self.is_primary else f"standby, primary {self._primary_address or 'unknown'}")

    async def stop(self, release: bool = True) -> None:
        """Stop serving; with `release`, hand the lease back so a standby takes over at once."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self._server is not None:
            await self._server.stop(grace=0.2)
            self._server = None
        if release and self._engine is not None and self._loaded:
            try:
                await self._engine.transact(self._release_fn)
            except Exception as e:
                log.warning("mgmtd %s: could not release the lease: %s", self.id, e)
        self._loaded = False
        self._primary_until = 0.0
        await self._close_engine()

    async def _close_engine(self):
        if self._kv_url is not None and self._engine is not None:
            await self._engine.close()
            self._engine = None

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()

    async def _check_cluster_id(self):
        async def fn(txn):
            cur = await txn.get(K_CLUSTER)
            if cur is None:
                txn.set(K_CLUSTER, self.cluster_id.encode())
                return self.cluster_id
            return cur.decode()

        found = await self._engine.transact(fn)
        if found != self.cluster_id:
            raise MgmtdError(INVALID_ARGUMENT, f"the KV holds cluster {found!r}, not {self.cluster_id!r}")

    # ---- primary lease ----------------------------------------------------------------------------

    async def _lease_loop(self):
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._lease_step()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("mgmtd %s: lease renewal failed: %s", self.id, e)

    async def _lease_step(self):
        started = time.monotonic()
        now_ms = _now_ms()
        lease_ms = int(self.lease_s * 1000)

        async def fn(txn):
            raw = await txn.get(K_LEASE)
            cur = json.loads(raw) if raw else None
            if cur is None or cur["holder"] == self.id or cur["expires_ms"] < now_ms:
                txn.set(K_LEASE, json.dumps({"holder": self.id, "address": self.address,
                                             "expires_ms": now_ms + lease_ms}).encode())
                return True, self.address
            return False, cur["address"]

        won, address = await self._engine.transact(fn)
        if won:
            # A lapsed lease may have been held (and released) by another
            # mgmtd meanwhile: reload then, as on a takeover.
            lapsed = time.monotonic() >= self._primary_until
            # Count from before the transaction, so we stop acting as primary
            # no later than a standby may take over.
            self._primary_until = started + self.lease_s * 0.95
            self._primary_address = self.address
            if not self._loaded or lapsed:
                self._loaded = False
                await self._become_primary()
        else:
            if self._loaded:
                log.warning("mgmtd %s: lost the lease to %s", self.id, address)
            self._loaded = False
            self._primary_until = 0.0
            self._primary_address = address

    async def _release_fn(self, txn):
        raw = await txn.get(K_LEASE)
        if raw and json.loads(raw)["holder"] == self.id:
            txn.clear(K_LEASE)

    async def _become_primary(self):
        async with self._lock:
            await self._load()
            now = self._clock()
            # Grace: every node gets a full heartbeat timeout to report to us.
            self._last_seen = {n: now for n in self._nodes}
            self._alive = {n: True for n in self._nodes}
            self._reports.clear()
            self._usage.clear()
            self._loaded = True
            try:
                await self._commit({}, bump=True)  # clients refresh: liveness is ours now
            except Exception:
                self._loaded = False
                raise
        log.info("mgmtd %s is primary (routing version %d, %d nodes, %d chains)",
                 self.id, self._version, len(self._nodes), len(self._chains))

    async def _load(self):
        async def fn(txn):
            out = {}
            for name, prefix in (("node", K_NODE), ("target", K_TARGET), ("chain", K_CHAIN),
                                 ("table", K_TABLE), ("next", K_NEXT)):
                out[name] = [kv async for kv in txn.get_range(prefix, _end(prefix))]
            out["version"] = await txn.get(K_VERSION)
            return out

        data = await self._engine.transact(fn)
        self._nodes = {}
        for _, v in data["node"]:
            n = mgmtd_pb2.NodeInfo.FromString(v)
            self._nodes[n.node_id] = n
        self._targets = {}
        for _, v in data["target"]:
            t = mgmtd_pb2.TargetInfo.FromString(v)
            self._targets[t.target_id] = t
        self._chains = {}
        for _, v in data["chain"]:
            c = chain_from_proto(mgmtd_pb2.ChainInfo.FromString(v))
            self._chains[c.chain_id] = c
        self._tables = {}
        for _, v in data["table"]:
            t = mgmtd_pb2.ChainTableInfo.FromString(v)
            self._tables.setdefault(t.table_id, {})[t.version] = tuple(t.chain_ids)
        self._next = {"node": 1, "target": 1, "chain": 1}
        for k, v in data["next"]:
            self._next[k[len(K_NEXT):].decode()] = int(v)
        self._version = int(data["version"] or 0)

    # ---- KV writes --------------------------------------------------------------------------------

    async def _commit(self, puts: dict[bytes, bytes | None], *, bump: bool = False,
                      idem: tuple[bytes, object] | None = None) -> None:
        """Write `puts` (None clears) in one transaction, if we still hold the lease.
        With `bump`, the routing version moves too (applied here on success)."""
        if bump:
            puts = dict(puts)
            puts[K_VERSION] = str(self._version + 1).encode()
        if idem and idem[0]:
            puts = dict(puts)
            puts[K_IDEM + idem[0]] = _u64(_now_ms()) + idem[1].SerializeToString()
        now_ms = _now_ms()

        async def fn(txn):
            raw = await txn.get(K_LEASE)
            lease = json.loads(raw) if raw else None
            if not lease or lease["holder"] != self.id or lease["expires_ms"] < now_ms:
                raise _NotLeaseHolder(lease["address"] if lease else "")
            for k, v in puts.items():
                if v is None:
                    txn.clear(k)
                else:
                    txn.set(k, v)

        try:
            await self._engine.transact(fn)
        except _NotLeaseHolder as e:
            self._loaded = False
            self._primary_until = 0.0
            self._primary_address = str(e)
            raise MgmtdError(NOT_PRIMARY, f"mgmtd {self.address} lost the primary lease"
                             + (f"; the primary is {e}" if str(e) else "")) from None
        if bump:
            self._version += 1

    async def _idem_reply(self, header, reply_cls):
        if not header.request_uuid:
            return None
        raw = await self._engine.transact(lambda txn: txn.snapshot_get(K_IDEM + header.request_uuid))
        return reply_cls.FromString(raw[8:]) if raw else None

    async def _purge_idem(self):
        cutoff = _now_ms() - int(IDEM_TTL_S * 1000)

        async def fn(txn):
            n = 0
            async for k, v in txn.snapshot_get_range(K_IDEM, _end(K_IDEM)):
                if struct.unpack(">Q", v[:8])[0] < cutoff:
                    txn.clear(k)
                    n += 1
                    if n >= 1000:
                        break
            return n

        return await self._engine.transact(fn)

    def _alloc(self, kind: str, puts: dict, staged: dict) -> int:
        n = staged.get(kind, self._next[kind])
        staged[kind] = n + 1
        puts[K_NEXT + kind.encode()] = str(n + 1).encode()
        return n

    # ---- liveness and chains ------------------------------------------------------------------------

    def _node_alive(self, node_id: int, now: float) -> bool:
        last = self._last_seen.get(node_id)
        return last is not None and now - last <= self.heartbeat_timeout

    def _local_states(self, chain: Chain, alive: dict[int, bool]) -> dict[int, LocalState]:
        out = {}
        for t, ps in chain.targets:
            info = self._targets.get(t)
            if info is None or info.admin_offline or not alive.get(info.node_id, False):
                out[t] = LocalState.OFFLINE
            elif t in self._reports:
                state, seen = self._reports[t]
                if state is LocalState.UPTODATE and seen < chain.version:
                    state = LocalState.ONLINE  # a "resync done" from before the chain's last change
                out[t] = state
            else:
                # No report since we became primary: hold the target where it is.
                out[t] = {PublicState.SERVING: LocalState.ONLINE, PublicState.LASTSRV: LocalState.OFFLINE,
                          PublicState.SYNCING: LocalState.ONLINE, PublicState.WAITING: LocalState.UPTODATE,
                          PublicState.OFFLINE: LocalState.OFFLINE}[ps]
        return out

    async def _reconcile_locked(self, chain_ids=None) -> bool:
        """One step of every (or the given) chain; commit and apply. Caller holds the lock."""
        now = self._clock()
        alive = {n: self._node_alive(n, now) for n in self._nodes}
        flips = [n for n in self._nodes if alive[n] != self._alive.get(n)
                 and self._nodes[n].type != mgmtd_pb2.NODE_CLIENT]
        changed = []
        for cid in (self._chains if chain_ids is None else chain_ids):
            old = self._chains[cid]
            new = next_chain(old, self._local_states(old, alive))
            if new is not old:
                changed.append(new)
        if not changed and not flips:
            self._alive = alive
            return False
        puts = {K_CHAIN + _u64(c.chain_id): chain_to_proto(c).SerializeToString() for c in changed}
        await self._commit(puts, bump=True)
        self._alive = alive
        for n in flips:
            log.info("node %d (%s) is %s", n, self._nodes[n].address, "alive" if alive[n] else "dead")
        for c in changed:
            log.info("chain %d v%d -> v%d: %s", c.chain_id, self._chains[c.chain_id].version, c.version,
                     " ".join(f"{t}:{ps.name}" for t, ps in c.targets))
            self._chains[c.chain_id] = c
        return True

    async def tick(self) -> bool:
        """Apply heartbeat timeouts and move chains one step. True if anything changed."""
        if not self.is_primary:
            return False
        async with self._lock:
            if not self.is_primary:
                return False
            return await self._reconcile_locked()

    async def _tick_loop(self):
        last_purge = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
                if self.is_primary and time.monotonic() - last_purge > 60:
                    last_purge = time.monotonic()
                    await self._purge_idem()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("mgmtd %s: tick failed: %s", self.id, e)

    # ---- request plumbing ---------------------------------------------------------------------------

    def _check_header(self, header):
        if header.cluster_id and header.cluster_id != self.cluster_id:
            raise MgmtdError(INVALID_ARGUMENT, f"request for cluster {header.cluster_id!r} reached the "
                             f"mgmtd of cluster {self.cluster_id!r}")

    def _error_reply(self, reply_cls, code, message):
        reply = reply_cls()
        reply.status.code = code
        reply.status.message = message
        reply.primary_address = self.primary_address or ""
        return reply

    def _ok(self, reply):
        reply.primary_address = self.address
        return reply

    def _node_proto(self, n: mgmtd_pb2.NodeInfo, now: float) -> mgmtd_pb2.NodeInfo:
        out = mgmtd_pb2.NodeInfo()
        out.CopyFrom(n)
        out.alive = self._node_alive(n.node_id, now)
        last = self._last_seen.get(n.node_id)
        out.last_heartbeat_age_ms = int((now - last) * 1000) if last is not None else -1
        return out

    def _target_proto(self, t: mgmtd_pb2.TargetInfo) -> mgmtd_pb2.TargetInfo:
        out = mgmtd_pb2.TargetInfo()
        out.CopyFrom(t)
        if t.chain_id and t.chain_id in self._chains:
            out.public_state = int(self._chains[t.chain_id].states().get(t.target_id, 0))
        if t.target_id in self._reports:
            out.local_state = int(self._reports[t.target_id][0])
        used, total, device = self._usage.get(t.target_id, (0, 0, ""))
        out.used_bytes, out.total_bytes, out.device = used, total, device
        return out

    def _table_proto(self, table_id: int, version: int) -> mgmtd_pb2.ChainTableInfo:
        return mgmtd_pb2.ChainTableInfo(table_id=table_id, version=version,
                                        chain_ids=self._tables[table_id][version])

    # ---- RPCs -----------------------------------------------------------------------------------------

    @_rpc(mgmtd_pb2.RegisterNodeReply)
    async def register_node(self, req: mgmtd_pb2.RegisterNodeRequest) -> mgmtd_pb2.RegisterNodeReply:
        """Register (or re-register after a restart) a node and its targets."""
        if req.type not in (mgmtd_pb2.NODE_STORAGE, mgmtd_pb2.NODE_META, mgmtd_pb2.NODE_CLIENT):
            raise MgmtdError(INVALID_ARGUMENT, f"node type {req.type} is not STORAGE, META or CLIENT")
        if req.type != mgmtd_pb2.NODE_CLIENT or req.address:  # a mount need not listen anywhere
            _check_address(req.address, "node address")
        if req.data_address:  # a flyfs/net address: tcp://HOST:PORT
            _check_address(req.data_address.split("://", 1)[-1], "node data address")
        if req.targets and req.type != mgmtd_pb2.NODE_STORAGE:
            raise MgmtdError(INVALID_ARGUMENT, "only storage nodes have targets")
        paths, ids = set(), set()
        for spec in req.targets:
            if not spec.data_path:
                raise MgmtdError(INVALID_ARGUMENT, "every target needs a data path")
            if spec.data_path in paths:
                raise MgmtdError(INVALID_ARGUMENT, f"data path {spec.data_path!r} is listed twice")
            if spec.target_id and spec.target_id in ids:
                raise MgmtdError(INVALID_ARGUMENT, f"target {spec.target_id} is listed twice")
            paths.add(spec.data_path)
            ids.add(spec.target_id)
        async with self._lock:
            if (done := await self._idem_reply(req.header, mgmtd_pb2.RegisterNodeReply)) is not None:
                return done
            now = self._clock()
            puts: dict = {}
            staged: dict = {}
            node_id = req.node_id
            if not node_id:
                # A process that lost its node id (a stateless metadata server)
                # and now holds the same address on the same host replaces the
                # node that had it: only one process can bind an address, so the
                # old one is gone even if its heartbeat has not timed out yet.
                for n in self._nodes.values():
                    if (n.address == req.address and n.type == req.type and n.hostname == req.hostname
                            and n.pid != req.pid and req.type != mgmtd_pb2.NODE_CLIENT):
                        node_id = n.node_id
                        break
            old = self._nodes.get(node_id) if node_id else None
            if old is not None and old.type != req.type:
                raise MgmtdError(INVALID_ARGUMENT, f"node {node_id} is registered as "
                                 f"{mgmtd_pb2.NodeType.Name(old.type)}, not {mgmtd_pb2.NodeType.Name(req.type)}")
            for n in self._nodes.values():
                if n.node_id != node_id and n.address == req.address and self._node_alive(n.node_id, now) \
                        and n.type != mgmtd_pb2.NODE_CLIENT and req.type != mgmtd_pb2.NODE_CLIENT:
                    raise MgmtdError(INVALID_ARGUMENT, f"address {req.address} is in use by live node {n.node_id}")
            if not node_id:
                node_id = self._alloc("node", puts, staged)
            elif node_id >= self._next["node"]:
                staged["node"] = node_id + 1
                puts[K_NEXT + b"node"] = str(node_id + 1).encode()
            node = mgmtd_pb2.NodeInfo(node_id=node_id, type=req.type, address=req.address, pid=req.pid,
                                      hostname=req.hostname, registered_ms=_now_ms(),
                                      data_address=req.data_address)
            puts[K_NODE + _u64(node_id)] = node.SerializeToString()
            new_targets = []
            for spec in req.targets:
                tid = spec.target_id
                cur = self._targets.get(tid) if tid else None
                if cur is not None and cur.node_id != node_id:
                    raise MgmtdError(INVALID_ARGUMENT, f"target {tid} belongs to node {cur.node_id}")
                if not tid:
                    tid = self._alloc("target", puts, staged)
                elif tid >= staged.get("target", self._next["target"]):
                    staged["target"] = tid + 1
                    puts[K_NEXT + b"target"] = str(tid + 1).encode()
                t = mgmtd_pb2.TargetInfo(target_id=tid, node_id=node_id, data_path=spec.data_path,
                                         chain_id=cur.chain_id if cur else 0)
                puts[K_TARGET + _u64(tid)] = t.SerializeToString()
                new_targets.append(t)
            reply = mgmtd_pb2.RegisterNodeReply(
                node_id=node_id, target_ids=[t.target_id for t in new_targets],
                routing_version=self._version + 1, lease_ms=int(self.heartbeat_timeout * 1000),
                cluster_id=self.cluster_id)
            self._ok(reply)
            await self._commit(puts, bump=True, idem=(req.header.request_uuid, reply))
            self._next.update(staged)
            self._nodes[node_id] = node
            for t in new_targets:
                self._targets[t.target_id] = t
            # A new process: its chained targets are down until it heartbeats
            # (see module doc); free ones wait for their first report.
            mine = [t for t in self._targets.values() if t.node_id == node_id]
            for t in mine:
                if t.chain_id:
                    self._reports[t.target_id] = (LocalState.OFFLINE, 0)
                else:
                    self._reports.pop(t.target_id, None)
            self._last_seen[node_id] = now
            self._alive[node_id] = True
            log.info("registered %s node %d at %s with targets %s", mgmtd_pb2.NodeType.Name(req.type),
                     node_id, req.address, [t.target_id for t in new_targets])
            chains = sorted({t.chain_id for t in mine if t.chain_id in self._chains})
            if chains:
                await self._reconcile_locked(chains)
            return reply

    @_rpc(mgmtd_pb2.HeartbeatReply)
    async def heartbeat(self, req: mgmtd_pb2.HeartbeatRequest) -> mgmtd_pb2.HeartbeatReply:
        """Record a node's liveness and its targets' local states; renew its lease."""
        node = self._nodes.get(req.node_id)
        if node is None:
            raise MgmtdError(NOT_FOUND, f"node {req.node_id} is not registered; register it first")
        seen = set()
        for th in req.targets:
            t = self._targets.get(th.target_id)
            if t is None or t.node_id != req.node_id:
                raise MgmtdError(NOT_FOUND, f"target {th.target_id} is not registered to node {req.node_id}")
            if th.local_state not in (mgmtd_pb2.LOCAL_UPTODATE, mgmtd_pb2.LOCAL_ONLINE, mgmtd_pb2.LOCAL_OFFLINE):
                raise MgmtdError(INVALID_ARGUMENT, f"target {th.target_id}: local state {th.local_state} "
                                 "is not UPTODATE, ONLINE or OFFLINE")
            if th.target_id in seen:
                raise MgmtdError(INVALID_ARGUMENT, f"target {th.target_id} is reported twice")
            seen.add(th.target_id)
        async with self._lock:
            self._last_seen[req.node_id] = self._clock()
            reported = {th.target_id: th for th in req.targets}
            chains = set()
            for t in self._targets.values():
                if t.node_id != req.node_id:
                    continue
                th = reported.get(t.target_id)
                if th is None:
                    self._reports[t.target_id] = (LocalState.OFFLINE, 0)
                else:
                    self._reports[t.target_id] = (LocalState(th.local_state), th.chain_version)
                    self._usage[t.target_id] = (th.used_bytes, th.total_bytes, th.device)
                if t.chain_id in self._chains:
                    chains.add(t.chain_id)
            await self._reconcile_locked(sorted(chains))
            lease_ms = int(self.heartbeat_timeout * 1000)
            return self._ok(mgmtd_pb2.HeartbeatReply(routing_version=self._version, lease_ms=lease_ms,
                                                     lease_expiry_ms=_now_ms() + lease_ms))

    @_rpc(mgmtd_pb2.GetRoutingInfoReply)
    async def get_routing_info(self, req: mgmtd_pb2.GetRoutingInfoRequest) -> mgmtd_pb2.GetRoutingInfoReply:
        """The routing info, or just `unchanged` when the caller's version is current."""
        if req.known_version and req.known_version == self._version:
            return self._ok(mgmtd_pb2.GetRoutingInfoReply(unchanged=True))
        return self._ok(mgmtd_pb2.GetRoutingInfoReply(info=self.routing_info()))

    def routing_info(self) -> mgmtd_pb2.RoutingInfo:
        """Build the current RoutingInfo (client nodes are left out)."""
        now = self._clock()
        info = mgmtd_pb2.RoutingInfo(version=self._version)
        info.nodes.extend(self._node_proto(n, now) for _, n in sorted(self._nodes.items())
                          if n.type != mgmtd_pb2.NODE_CLIENT)
        info.targets.extend(self._target_proto(t) for _, t in sorted(self._targets.items()))
        info.chains.extend(chain_to_proto(c) for _, c in sorted(self._chains.items()))
        for tid in sorted(self._tables):
            for v in sorted(self._tables[tid]):
                info.chain_tables.append(self._table_proto(tid, v))
        return info

    @_rpc(mgmtd_pb2.CreateChainsReply)
    async def create_chains(self, req: mgmtd_pb2.CreateChainsRequest) -> mgmtd_pb2.CreateChainsReply:
        """Build chains of `replication` targets on distinct nodes from free targets."""
        if req.replication < 1:
            raise MgmtdError(INVALID_ARGUMENT, "replication factor must be at least 1")
        async with self._lock:
            if (done := await self._idem_reply(req.header, mgmtd_pb2.CreateChainsReply)) is not None:
                return done
            now = self._clock()
            if req.target_ids:
                if len(set(req.target_ids)) != len(req.target_ids):
                    raise MgmtdError(INVALID_ARGUMENT, "a target is listed twice")
                for tid in req.target_ids:
                    t = self._targets.get(tid)
                    if t is None:
                        raise MgmtdError(NOT_FOUND, f"target {tid} is not registered")
                    if t.chain_id:
                        raise MgmtdError(INVALID_ARGUMENT, f"target {tid} is already in chain {t.chain_id}")
                    if t.admin_offline or not self._node_alive(t.node_id, now):
                        raise MgmtdError(INVALID_ARGUMENT, f"target {tid} is offline")
                candidates = list(req.target_ids)
            else:
                candidates = [t.target_id for t in self._targets.values() if not t.chain_id
                              and not t.admin_offline and self._node_alive(t.node_id, now)]
            free = {tid: self._targets[tid].node_id for tid in candidates}
            try:
                plan = await asyncio.to_thread(plan_chains, free, req.replication) if len(free) > 64 \
                    else plan_chains(free, req.replication)
            except LayoutError as e:
                raise MgmtdError(INVALID_ARGUMENT, str(e)) from None
            if not plan:
                raise MgmtdError(INVALID_ARGUMENT, f"the free targets cannot form a chain of {req.replication}")
            puts: dict = {}
            staged: dict = {}
            chains = []
            new_targets = {}
            for tids in plan:
                cid = self._alloc("chain", puts, staged)
                c = Chain.new(cid, tids)
                chains.append(c)
                puts[K_CHAIN + _u64(cid)] = chain_to_proto(c).SerializeToString()
                for tid in tids:
                    t = mgmtd_pb2.TargetInfo()
                    t.CopyFrom(self._targets[tid])
                    t.chain_id = cid
                    new_targets[tid] = t
                    puts[K_TARGET + _u64(tid)] = t.SerializeToString()
            used = {t for tids in plan for t in tids}
            reply = mgmtd_pb2.CreateChainsReply(chains=[chain_to_proto(c) for c in chains],
                                                unused_target_ids=sorted(set(free) - used))
            table = None
            if req.table_id:
                version = max(self._tables.get(req.table_id, {0: ()})) + 1
                table = mgmtd_pb2.ChainTableInfo(table_id=req.table_id, version=version,
                                                 chain_ids=[c.chain_id for c in chains])
                puts[K_TABLE + struct.pack(">II", req.table_id, version)] = table.SerializeToString()
                reply.table.CopyFrom(table)
            self._ok(reply)
            await self._commit(puts, bump=True, idem=(req.header.request_uuid, reply))
            self._next.update(staged)
            self._targets.update(new_targets)
            for c in chains:
                self._chains[c.chain_id] = c
            if table is not None:
                self._tables.setdefault(table.table_id, {})[table.version] = tuple(table.chain_ids)
            log.info("created chains %s (replication %d)", [c.target_ids for c in chains], req.replication)
            return reply

    @_rpc(mgmtd_pb2.SetChainTableReply)
    async def set_chain_table(self, req: mgmtd_pb2.SetChainTableRequest) -> mgmtd_pb2.SetChainTableReply:
        """Make `chain_ids` the next version of chain table `table_id` (no-op if unchanged)."""
        if req.table_id < 1:
            raise MgmtdError(INVALID_ARGUMENT, "chain table id must be at least 1")
        if not req.chain_ids:
            raise MgmtdError(INVALID_ARGUMENT, "a chain table needs at least one chain")
        if len(set(req.chain_ids)) != len(req.chain_ids):
            raise MgmtdError(INVALID_ARGUMENT, "a chain is listed twice")
        for cid in req.chain_ids:
            if cid not in self._chains:
                raise MgmtdError(NOT_FOUND, f"chain {cid} does not exist")
        async with self._lock:
            if (done := await self._idem_reply(req.header, mgmtd_pb2.SetChainTableReply)) is not None:
                return done
            versions = self._tables.get(req.table_id, {})
            if versions and versions[max(versions)] == tuple(req.chain_ids):
                return self._ok(mgmtd_pb2.SetChainTableReply(table=self._table_proto(req.table_id, max(versions))))
            version = max(versions, default=0) + 1
            table = mgmtd_pb2.ChainTableInfo(table_id=req.table_id, version=version, chain_ids=req.chain_ids)
            reply = self._ok(mgmtd_pb2.SetChainTableReply(table=table))
            await self._commit({K_TABLE + struct.pack(">II", req.table_id, version): table.SerializeToString()},
                               bump=True, idem=(req.header.request_uuid, reply))
            self._tables.setdefault(req.table_id, {})[version] = tuple(req.chain_ids)
            return reply

    @_rpc(mgmtd_pb2.GetChainTableReply)
    async def get_chain_table(self, req: mgmtd_pb2.GetChainTableRequest) -> mgmtd_pb2.GetChainTableReply:
        """One version (0: the latest) of a chain table."""
        versions = self._tables.get(req.table_id)
        if not versions:
            raise MgmtdError(NOT_FOUND, f"chain table {req.table_id} does not exist")
        version = req.version or max(versions)
        if version not in versions:
            raise MgmtdError(NOT_FOUND, f"chain table {req.table_id} has no version {version} "
                             f"(latest is {max(versions)})")
        return self._ok(mgmtd_pb2.GetChainTableReply(table=self._table_proto(req.table_id, version)))

    @_rpc(mgmtd_pb2.OfflineTargetReply)
    async def offline_target(self, req: mgmtd_pb2.OfflineTargetRequest) -> mgmtd_pb2.OfflineTargetReply:
        """Hold a target OFFLINE (e.g. a failing disk) until its node registers again."""
        if req.target_id not in self._targets:
            raise MgmtdError(NOT_FOUND, f"target {req.target_id} is not registered")
        async with self._lock:
            t = mgmtd_pb2.TargetInfo()
            t.CopyFrom(self._targets[req.target_id])
            if not t.admin_offline:
                t.admin_offline = True
                await self._commit({K_TARGET + _u64(t.target_id): t.SerializeToString()}, bump=True)
                self._targets[t.target_id] = t
                log.info("target %d taken offline by an operator", t.target_id)
            reply = mgmtd_pb2.OfflineTargetReply()
            if t.chain_id in self._chains:
                await self._reconcile_locked([t.chain_id])
                reply.chain.CopyFrom(chain_to_proto(self._chains[t.chain_id]))
            return self._ok(reply)

    @_rpc(mgmtd_pb2.ListNodesReply)
    async def list_nodes(self, req: mgmtd_pb2.ListNodesRequest) -> mgmtd_pb2.ListNodesReply:
        """Every registered node (of one type, if given), with liveness."""
        if req.type not in (mgmtd_pb2.NODE_TYPE_UNSPECIFIED, mgmtd_pb2.NODE_STORAGE, mgmtd_pb2.NODE_META,
                            mgmtd_pb2.NODE_CLIENT):
            raise MgmtdError(INVALID_ARGUMENT, f"node type {req.type} is not STORAGE, META or CLIENT")
        now = self._clock()
        return self._ok(mgmtd_pb2.ListNodesReply(nodes=[
            self._node_proto(n, now) for _, n in sorted(self._nodes.items())
            if not req.type or n.type == req.type]))

    @_rpc(mgmtd_pb2.ListChainsReply)
    async def list_chains(self, req: mgmtd_pb2.ListChainsRequest) -> mgmtd_pb2.ListChainsReply:
        """Every chain, or those of a chain table's latest version, with their targets."""
        if req.table_id:
            versions = self._tables.get(req.table_id)
            if not versions:
                raise MgmtdError(NOT_FOUND, f"chain table {req.table_id} does not exist")
            ids = list(versions[max(versions)])
        else:
            ids = sorted(self._chains)
        chains = [self._chains[i] for i in ids]
        tids = [t for c in chains for t in c.target_ids]
        return self._ok(mgmtd_pb2.ListChainsReply(
            chains=[chain_to_proto(c) for c in chains],
            targets=[self._target_proto(self._targets[t]) for t in tids if t in self._targets]))


def _servicer_for(mgmtd: Mgmtd) -> mgmtd_pb2_grpc.MgmtdServicer:
    """A servicer forwarding each RPC (CamelCase) to the Mgmtd method (snake_case)."""
    methods = {}
    for m in mgmtd_pb2.DESCRIPTOR.services_by_name["Mgmtd"].methods:
        snake = "".join("_" + ch.lower() if ch.isupper() else ch for ch in m.name).lstrip("_")
        handler = getattr(mgmtd, snake)

        async def forward(self, request, context, _handler=handler):
            return await _handler(request)

        methods[m.name] = forward
    return type("MgmtdServicer", (mgmtd_pb2_grpc.MgmtdServicer,), methods)()


# ---- command line -------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flyfs mgmtd",
        description="Run the cluster manager (membership, heartbeats, chains, routing info).",
        epilog="example: flyfs mgmtd --kv rocksdb:///var/lib/flyfs/mgmtd --listen 127.0.0.1:8000")
    env = os.environ.get
    p.add_argument("--kv", default=env("FLYFS_MGMTD_KV"), required=env("FLYFS_MGMTD_KV") is None,
                   help="KV engine URL: memory://, rocksdb:///DIR or etcd://HOST:PORT/PREFIX "
                        "(env FLYFS_MGMTD_KV)")
    p.add_argument("--listen", default=env("FLYFS_MGMTD_LISTEN", "127.0.0.1:8000"),
                   help="HOST:PORT to serve gRPC on (env FLYFS_MGMTD_LISTEN; default %(default)s)")
    p.add_argument("--advertise", default=env("FLYFS_MGMTD_ADVERTISE"),
                   help="address other processes should use, if not the listen address")
    p.add_argument("--cluster-id", default=env("FLYFS_CLUSTER_ID", "flyfs"), help="default %(default)s")
    p.add_argument("--heartbeat-timeout", type=float, default=float(env("FLYFS_MGMTD_HEARTBEAT_TIMEOUT", "10")),
                   help="seconds without heartbeat before a node is dead (default %(default)s)")
    p.add_argument("--lease", type=float, default=float(env("FLYFS_MGMTD_LEASE", "5")),
                   help="primary lease in seconds among several mgmtd on one KV (default %(default)s)")
    p.add_argument("--id", default=env("FLYFS_MGMTD_ID"),
                   help="this mgmtd's id, unique among the mgmtd on one KV; restarted with the same id it "
                        "takes its lease back at once instead of waiting for it to expire "
                        "(default host:pid:random)")
    p.add_argument("--log-level", default=env("FLYFS_LOG_LEVEL", "INFO"))
    return p


async def _serve(args) -> None:
    m = Mgmtd(args.kv, args.listen, cluster_id=args.cluster_id, heartbeat_timeout=args.heartbeat_timeout,
              lease_s=args.lease, mgmtd_id=args.id, advertise=args.advertise)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await m.start()
    print(f"mgmtd listening on {m.address}", flush=True)
    try:
        await stop.wait()
    finally:
        await m.stop()


def main(argv: list[str] | None = None) -> int:
    """`flyfs mgmtd --kv URL --listen HOST:PORT`: serve until SIGINT/SIGTERM."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        _check_address(args.listen, "--listen", allow_port_0=True)
    except MgmtdError as e:
        print(f"flyfs mgmtd: {e.message}", file=sys.stderr)
        return 2
    import uvloop
    try:
        uvloop.run(_serve(args))
    except (OSError, KVError, MgmtdError) as e:
        print(f"flyfs mgmtd: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
