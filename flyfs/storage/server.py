"""The storage daemon: chunk targets served over the data plane, replicated with CRAQ.

    flyfs storage --mgmtd HOST:PORT --data DIR[,DIR...] --listen HOST:PORT

One process serves one or more targets (one per data directory, each a
`ChunkEngine`). It registers with mgmtd (the node id and each target id are
kept in DIR/flyfs-target.json so a restart keeps its identity), heartbeats
(per-target local state, chain version, usage) and follows the routing info.
Requests arrive as flyfs/net frames: the method is a storage_pb2.StorageMethod,
the header a storage.proto request, chunk bytes in the payload. Errors are
replies with a flyfs.Status, never transport failures.

Replication (flyfs/storage/craq.py has the decisions and the reasoning):
client updates go to the chain head, which stages a pending version,
forwards to its successor and commits once the successor answered; the
successor does the same, so the tail commits first. A target that cannot
reach its successor keeps retrying (refreshing routing, so a failed
successor is skipped once mgmtd takes it out of the chain) for
`StorageConfig.update_retry` seconds. A node whose last successful heartbeat
was sent more than half its lease ago takes no updates (NOT_SERVING), so a
node cut off from mgmtd cannot write behind the back of the chain that
replaced it. Resync of a returning target is driven by its predecessor
(flyfs/storage/resync.py). All disk I/O runs in the chunk engine's threads, one
trip per update step: look up + decide + stage (+ commit on the tail), then commit.
With FLYFS_STORAGE_PROFILE=DIR the daemon writes the wall time of each phase
(`PhaseTimes`) and its CPU time to DIR/storage-NODE.json when it stops.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
from crc32c import crc32c
from google.protobuf.message import DecodeError

from flyfs import net
from flyfs.net import eager
from flyfs.cluster.chain_state import Chain, PublicState
from flyfs.cluster.mgmtd_client import MgmtdClient, MgmtdError, NODE_STORAGE, RoutingInfo
from flyfs.proto import common_pb2, storage_pb2
from flyfs.storage import craq
from flyfs.storage.chunk_engine import NOWAIT_MAX, ChunkEngine, ChunkMeta, WouldBlock
from flyfs.storage.errors import (ChunkCorrupted, ChunkNotCommitted, ChunkNotFound, StorageError,
                                  VersionError)
from flyfs.storage.resync import resync_loop

__all__ = ["StorageServer", "StorageConfig", "StatusError", "main", "IDENTITY_FILE",
           "meta_to_proto", "UPDATE_TYPES"]

log = logging.getLogger("flyfs.storage")

SC = common_pb2
S = storage_pb2
IDENTITY_FILE = "flyfs-target.json"
UPDATE_TYPES = {S.UPDATE_WRITE: "write", S.UPDATE_TRUNCATE: "truncate", S.UPDATE_REMOVE: "remove"}
MAX_READ_PIECES = 4096
MAX_DUMP_PAGE = 4096
# Statuses a predecessor keeps retrying a forward on (anything else is final).
_RETRY_FORWARD = {SC.STALE_ROUTING, SC.NOT_SERVING, SC.BUSY, SC.NOT_HEAD, SC.INTERNAL, SC.NOT_COMMITTED}


# The client's shared-memory reply slice of the request being handled (net.Request.reply_buffer).
_REPLY_BUFFER: contextvars.ContextVar = contextvars.ContextVar("reply_buffer", default=None)


@dataclass
class StorageConfig:
    """Tunables of a storage daemon (seconds unless noted)."""

    forward_timeout: float = 60.0      # one forward call to the successor (it may be retrying too)
    update_retry: float = 30.0         # how long a target keeps retrying a forward before it gives up
    register_timeout: float = 60.0     # start(): how long to wait for mgmtd
    heartbeat_interval: float | None = None  # default: lease / 6
    sync_timeout: float = 60.0         # one resync call
    sync_concurrency: int = 4          # chunks sent at once by one resync
    engine_workers: int = 8            # chunk engine threads per target
    max_chunk_size: int | None = None  # per-target engine limit (default: the engine's)
    mgmtd_timeout: float = 2.0
    mgmtd_retry_timeout: float = 5.0
    # False (as 3FS runs): an update is acknowledged once every replica has it in
    # the kernel; disks are synced every flush_interval and on a client's fsync
    # (STORAGE_FLUSH). True: every update is fdatasync'd before it is acknowledged.
    sync_writes: bool = False
    flush_interval: float = 5.0
    # Chunks of at most this many bytes keep their data in the target's metadata
    # store, not in files (chunk_engine.py, "Small chunks"); 0: every chunk in a file.
    inline_max: int = 64 * 1024
    # Writes are refused (NO_SPACE, ENOSPC to the client) once a target's disk has
    # less than this free: what is left lets removals and metadata writes go on,
    # so space can be freed again.
    reserve_bytes: int = 64 << 20


class StatusError(Exception):
    """A request failed with a flyfs.StatusCode; `fields` go into the reply."""

    def __init__(self, code: int, message: str, **fields):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields


meta_to_proto = craq.meta_to_proto


@contextlib.contextmanager
def _read_errors(role: craq.Role, any_state: bool):
    """Engine read errors as the StatusError a reader gets."""
    try:
        yield
    except ChunkNotFound as e:
        raise StatusError(SC.NOT_FOUND, str(e)) from None
    except ChunkNotCommitted as e:
        if role.is_read_tail and not any_state:
            # The tail's committed state is the chain's truth: nothing committed yet.
            raise StatusError(SC.NOT_FOUND, str(e)) from None
        raise StatusError(SC.NOT_COMMITTED, str(e)) from None


def _failed_read(e: StatusError | StorageError) -> S.ReadResult:
    """The result of a read piece that failed with `e`."""
    text = e.message if isinstance(e, StatusError) else str(e)
    return S.ReadResult(status=common_pb2.Status(code=e.code, message=text))


def _cid(c: S.ChunkId) -> bytes:
    return craq.chunk_id(c.inode, c.index)


def _hexid(cid: bytes) -> str:
    inode, index = craq.parse_chunk_id(cid)
    return f"{inode:#x}:{index}"


class _KeyedLocks:
    """asyncio locks by key, created on demand and dropped when unused."""

    def __init__(self):
        self._locks: dict = {}

    @contextlib.asynccontextmanager
    async def hold(self, key):
        ent = self._locks.get(key)
        if ent is None:
            ent = self._locks[key] = [asyncio.Lock(), 0]
        ent[1] += 1
        try:
            async with ent[0]:
                yield
        finally:
            ent[1] -= 1
            if ent[1] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


class PhaseTimes:
    """Wall time spent per phase of the update and read paths (count, seconds).

    Always collected (a dict update per phase); written as JSON at stop when
    the environment variable FLYFS_STORAGE_PROFILE names a directory, along
    with the process CPU time, so `flyfs bench storage --profile DIR` can show
    where a request's time goes.
    """

    def __init__(self):
        self.phases: dict[str, list] = {}

    def add(self, name: str, t0: float) -> float:
        """Charge the time since `t0` to `name`; returns now (the next phase's t0)."""
        now = time.perf_counter()
        ent = self.phases.get(name)
        if ent is None:
            ent = self.phases[name] = [0, 0.0]
        ent[0] += 1
        ent[1] += now - t0
        return now

    def snapshot(self) -> dict:
        cpu = os.times()
        phases = {k: {"count": n, "seconds": round(t, 6)} for k, (n, t) in sorted(self.phases.items())}
        return {"phases": phases, "cpu_user_s": cpu.user, "cpu_system_s": cpu.system}


class Target:
    """One local target: its engine, identity and replication state."""

    def __init__(self, path: str, engine: ChunkEngine, target_id: int):
        self.path = path
        self.engine = engine
        self.target_id = target_id
        self.chain_id = 0
        self.role: craq.Role | None = None
        self.synced_version: int | None = None   # chain version a resync into it finished at
        self.dedup = craq.DedupTable()
        self.total_bytes = 0
        # Completed when this target's successor changes: a forward waiting on the old
        # one (hung, cut off) is abandoned and goes to the new one.
        self.moved: asyncio.Future | None = None
        self.device = ""                     # "host:st_dev" of the disk holding it
        self.free_bytes: int | None = None   # the disk's free bytes at free_at (None: not known)
        self.free_at = 0.0


# --------------------------------------------------------------------------- identity files

def _read_identity(path: str) -> dict:
    try:
        with open(os.path.join(path, IDENTITY_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise SystemExit(f"flyfs storage: cannot read {os.path.join(path, IDENTITY_FILE)}: {e}") from None


def _write_identity(path: str, ident: dict) -> None:
    final = os.path.join(path, IDENTITY_FILE)
    tmp = final + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ident, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the daemon

class StorageServer:
    """A storage daemon serving the targets in `data_dirs`.

    `mgmtd`: the mgmtd address(es) (HOST:PORT, comma-separated for several).
    `listen`: HOST:PORT for the data plane (port 0 picks one). After
    `await start()` the node is registered, has routing info and a lease;
    `address` is its data-plane address (HOST:PORT).
    """

    def __init__(self, mgmtd: str, data_dirs: list[str], listen: str = "127.0.0.1:0", *,
                 cluster_id: str = "", config: StorageConfig | None = None,
                 advertise: str | None = None):
        if not data_dirs:
            raise ValueError("a storage daemon needs at least one data directory")
        paths = [os.path.abspath(d) for d in data_dirs]
        if len(set(paths)) != len(paths):
            raise ValueError("a data directory is listed twice")
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"listen address {listen!r} is not HOST:PORT")
        self.data_dirs = paths
        self.config = config or StorageConfig()
        self._listen_host, self._listen_port = host, int(port)
        self._advertise = advertise
        self._mgmtd_address = mgmtd
        self.mgmtd = MgmtdClient(mgmtd, cluster_id=cluster_id, timeout=self.config.mgmtd_timeout,
                                 retry_timeout=self.config.mgmtd_retry_timeout)
        self.pool = net.ConnectionPool(connect_timeout=5.0)
        self.targets: dict[int, Target] = {}
        self.node_id = 0
        self.lease = craq.Lease()
        self.routing: RoutingInfo | None = None
        self._server: net.Server | None = None
        self._locks = _KeyedLocks()
        # Payloads received and batch-read replies: reused buffers (see net.BufferPool).
        self._buffers = net.BufferPool()
        self.phases = PhaseTimes()
        self._tasks: set[asyncio.Task] = set()
        self._hb_task: asyncio.Task | None = None
        self._hb_wakeup: asyncio.Event | None = None
        self._refreshing: asyncio.Task | None = None
        self._refresh_started = 0.0
        self._resyncs: dict[int, tuple[tuple, asyncio.Task]] = {}
        self._resync_done: dict[int, tuple] = {}
        self._stopping = False
        self._started = False
        self._handlers: dict[int, tuple[type, type, Callable[..., Awaitable]]] = {
            S.STORAGE_UPDATE: (S.UpdateRequest, S.UpdateReply, self._on_client_update),
            S.STORAGE_FORWARD: (S.UpdateRequest, S.UpdateReply, self._on_forward),
            S.STORAGE_BATCH_READ: (S.BatchReadRequest, S.BatchReadReply, self._on_batch_read),
            S.STORAGE_REMOVE_CHUNKS: (S.RemoveChunksRequest, S.RemoveChunksReply, self._on_remove_chunks),
            S.STORAGE_QUERY_LAST_CHUNK: (S.QueryLastChunkRequest, S.QueryLastChunkReply,
                                         self._on_query_last_chunk),
            S.STORAGE_DUMP_CHUNK_META: (S.DumpChunkMetaRequest, S.DumpChunkMetaReply, self._on_dump),
            S.STORAGE_SYNC_INSTALL: (S.SyncInstallRequest, S.SyncInstallReply, self._on_sync_install),
            S.STORAGE_SYNC_REMOVE: (S.SyncRemoveRequest, S.SyncRemoveReply, self._on_sync_remove),
            S.STORAGE_SYNC_DONE: (S.SyncDoneRequest, S.SyncDoneReply, self._on_sync_done),
            S.STORAGE_FLUSH: (S.FlushRequest, S.FlushReply, self._on_flush),
        }

    # ----------------------------------------------------------------- lifecycle

    @property
    def address(self) -> str:
        """The data-plane address this node registered (HOST:PORT)."""
        if self._server is None:
            return ""
        return self._advertise or f"{self._listen_host}:{self._server.port}"

    async def start(self) -> None:
        """Open the targets, listen, register with mgmtd, get routing and a first lease."""
        if self._started:
            raise RuntimeError("storage server already started")
        self._started = True
        self._hb_wakeup = asyncio.Event()
        try:
            await self._open_targets()
            self._server = await net.serve(self._handle, self._listen_host, self._listen_port,
                                           buffers=self._buffers, inline=self._inline, eager=True)
            await self._register()
            await self._refresh_routing(force=True)
            await self._heartbeat_once()
            self._hb_task = self._spawn(self._heartbeat_loop(), "heartbeat")
            if not self.config.sync_writes and self.config.flush_interval > 0:
                self._spawn(self._flush_loop(), "flush")
        except BaseException:
            await self.stop()
            raise
        log.info("storage node %d serving targets %s on %s", self.node_id, sorted(self.targets),
                 self.address)

    async def stop(self) -> None:
        """Stop serving, cancel background work and close every target."""
        if self._stopping:
            return
        self._stopping = True
        tasks = list(self._tasks)
        if self._refreshing is not None:
            tasks.append(self._refreshing)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.close()
        await self.pool.close()
        for t in list(self.targets.values()):
            try:
                await t.engine.close()
            except Exception as e:  # keep closing the others
                log.warning("closing target %s: %s", t.path, e)
        await self.mgmtd.close()
        self._dump_phases()

    def _dump_phases(self) -> None:
        where = os.environ.get("FLYFS_STORAGE_PROFILE")
        if not where:
            return
        try:
            os.makedirs(where, exist_ok=True)
            with open(os.path.join(where, f"storage-{self.node_id}.json"), "w") as f:
                json.dump(self.phases.snapshot(), f, indent=1)
        except OSError as e:
            log.warning("cannot write the phase profile to %s: %s", where, e)

    async def __aenter__(self) -> "StorageServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _spawn(self, coro, name: str, quiet: bool = False) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"storage-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_quiet_done if quiet else self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._stopping:
            log.error("background task %s failed: %r", task.get_name(), task.exception())

    def _task_quiet_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()    # retrieved; whoever awaited it reported it

    async def _detached(self, coro, name: str):
        """Run an update to its end even if the request that started it goes away
        (its connection dropped): a half-done update would leave a stuck pending version."""
        if self._stopping:
            return await coro
        done, value = eager.start(asyncio.get_running_loop(), coro)   # (up to its first wait now)
        if done:
            return value
        self._tasks.add(value)
        value.set_name(f"storage-{name}")
        value.add_done_callback(self._task_quiet_done)
        return await asyncio.shield(value)

    async def _open_targets(self) -> None:
        idents = await asyncio.to_thread(lambda: [_read_identity(p) for p in self.data_dirs])
        node_ids = {i.get("node_id") for i in idents if i.get("node_id")}
        if len(node_ids) > 1:
            raise ValueError(f"data directories belong to different storage nodes {sorted(node_ids)}")
        self.node_id = node_ids.pop() if node_ids else 0
        kw = {"sync_writes": self.config.sync_writes, "inline_max": self.config.inline_max}
        if self.config.max_chunk_size:
            kw["max_chunk_size"] = self.config.max_chunk_size
        self._pending_targets = []
        for path, ident in zip(self.data_dirs, idents):
            engine = await ChunkEngine.open(path, workers=self.config.engine_workers, **kw)
            self._pending_targets.append((path, engine, int(ident.get("target_id", 0))))

    async def _register(self) -> None:
        deadline = time.monotonic() + self.config.register_timeout
        specs = [(tid, path) for path, _, tid in self._pending_targets]
        delay = 0.1
        while True:
            try:
                reply = await self.mgmtd.register_node(NODE_STORAGE, self.address, targets=specs,
                                                       node_id=self.node_id)
                break
            except MgmtdError as e:
                if e.code not in (SC.BUSY, SC.INTERNAL) or time.monotonic() > deadline:
                    raise RuntimeError(f"cannot register with mgmtd at {self._mgmtd_address}: "
                                       f"{e.message}") from None
                log.info("mgmtd not ready (%s); retrying", e.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        if reply.cluster_id:
            self.mgmtd.cluster_id = reply.cluster_id
        self.node_id = reply.node_id
        for (path, engine, _), tid in zip(self._pending_targets, reply.target_ids):
            await asyncio.to_thread(_write_identity, path,
                                    {"node_id": reply.node_id, "target_id": tid,
                                     "cluster_id": reply.cluster_id})
            self.targets[tid] = Target(path, engine, tid)
        await self._refresh_capacity()
        self._pending_targets = []
        # The registration renews nothing: writes wait for the first heartbeat.
        self._lease_ms = reply.lease_ms

    # ----------------------------------------------------------------- heartbeats and routing

    def _report(self) -> list[tuple]:
        out = []
        for t in self.targets.values():
            role = t.role
            chain_version = role.chain_version if role else 0
            state = craq.local_state(role.state if role else None, t.synced_version, chain_version)
            out.append((t.target_id, state, chain_version, t.engine.used_bytes(), t.total_bytes, t.device))
        return out

    async def _refresh_capacity(self) -> None:
        """A target's capacity is what it holds plus what its disk still has free, so
        the file system's free space (statfs) follows the disk, shared or not."""
        self._capacity_at = time.monotonic()
        targets = list(self.targets.values())
        devices = [(await asyncio.to_thread(os.stat, t.path)).st_dev for t in targets]
        for t, dev in zip(targets, devices):
            free = (await asyncio.to_thread(shutil.disk_usage, t.path)).free
            # Targets of this node on one disk share its free space (and nodes on one
            # disk too: the metadata service counts a device's free space once).
            t.total_bytes = t.engine.used_bytes() + free // devices.count(dev)
            t.device = f"{socket.gethostname()}:{dev}"

    async def _heartbeat_once(self) -> None:
        if time.monotonic() - getattr(self, "_capacity_at", 0.0) > 5.0:
            await self._refresh_capacity()
        sent = time.monotonic()
        routing_version = self.routing.version if self.routing else 0
        try:
            reply = await self.mgmtd.heartbeat(self.node_id, self._report(),
                                               routing_version=routing_version)
        except MgmtdError as e:
            if e.code == SC.NOT_FOUND:
                # mgmtd forgot us (a fresh KV): register again, keeping our ids.
                log.warning("mgmtd does not know node %d (%s); registering again", self.node_id, e)
                self._pending_targets = [(t.path, t.engine, t.target_id) for t in self.targets.values()]
                self.targets = {}
                await self._register()
                await self._refresh_routing(force=True)
                return
            raise
        self.lease.renewed(sent, reply.lease_ms)
        self._lease_ms = reply.lease_ms
        if self.routing is None or reply.routing_version != self.routing.version:
            await self._refresh_routing(force=True)

    def _heartbeat_interval(self) -> float:
        if self.config.heartbeat_interval:
            return self.config.heartbeat_interval
        return max(self._lease_ms / 1000.0 / 6, 0.05)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._hb_wakeup.wait(), self._heartbeat_interval())
            except asyncio.TimeoutError:
                pass
            self._hb_wakeup.clear()
            try:
                await self._heartbeat_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("heartbeat failed: %s (lease left %.2fs)", e, self.lease.remaining())

    async def _flush_loop(self) -> None:
        """Sync what the targets wrote without syncing, every flush_interval."""
        while True:
            await asyncio.sleep(self.config.flush_interval)
            try:
                await self.flush_targets(list(self.targets.values()))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("background flush failed: %s", e)

    async def flush_targets(self, targets: list[Target]) -> tuple[int, int]:
        """Sync the given targets' unsynced updates; returns (targets flushed, files synced)."""
        dirty = [t for t in targets if t.engine.sync.dirty]
        counts = await asyncio.gather(*(t.engine.sync_dirty() for t in dirty))
        return len(dirty), sum(counts)

    async def _refresh_routing(self, force: bool = False) -> None:
        """Fetch routing info newer than the moment of this call. Callers share one
        fetch in flight when it started after they asked (`force` is accepted for
        readability; every call asks for routing at least as new as now)."""
        since = time.monotonic()
        while True:
            task = self._refreshing
            if task is not None and not task.done():
                started = self._refresh_started
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if started >= since:
                        raise
                if started >= since:
                    return
                continue
            if self._refresh_started >= since and task is not None and not task.cancelled() \
                    and task.exception() is None:
                return
            self._refresh_started = time.monotonic()
            task = self._refreshing = asyncio.get_running_loop().create_task(self._do_refresh())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _do_refresh(self) -> None:
        info = await self.mgmtd.get_routing_info(force=True)
        self._apply_routing(info)

    def _apply_routing(self, info: RoutingInfo) -> None:
        if self.routing is not None and info.version < self.routing.version:
            return
        self.routing = info
        wake = False
        for t in self.targets.values():
            ti = info.targets.get(t.target_id)
            chain = info.chains.get(ti.chain_id) if ti is not None and ti.chain_id else None
            old = t.role
            t.chain_id = chain.chain_id if chain else 0
            t.role = craq.role_of(chain, t.target_id) if chain else None
            if t.moved is not None and (t.role is None or old is None or t.role.successor != old.successor
                                        or not t.role.on_write_path):
                t.moved.set_result(f"the successor of target {t.target_id} changed (routing v{info.version})")
                t.moved = None
            if t.role is None or t.role.state not in (PublicState.SYNCING, PublicState.SERVING):
                t.synced_version = None
            if (old is None) != (t.role is None) or (old and t.role and old.state != t.role.state):
                wake = True
                log.info("target %d: chain %d v%d, %s", t.target_id, t.chain_id,
                         t.role.chain_version if t.role else 0,
                         t.role.state.name if t.role and t.role.state else "not in a chain")
            self._check_resync(t)
        if wake and self._hb_wakeup is not None:
            self._hb_wakeup.set()

    def _check_resync(self, t: Target) -> None:
        """Start (or stop) the resync of this target's successor when it is SYNCING."""
        role = t.role
        want = None
        if role is not None and role.successor is not None and role.readable:
            chain = self.routing.chains[role.chain_id]
            if chain.states().get(role.successor) is PublicState.SYNCING:
                want = (role.chain_id, role.successor, role.chain_version)
        cur = self._resyncs.get(t.target_id)
        if cur is not None and cur[0] != want:
            cur[1].cancel()
            del self._resyncs[t.target_id]
            cur = None
        if want is not None and cur is None and self._resync_done.get(t.target_id) != want \
                and not self._stopping:
            task = self._spawn(resync_loop(self, t, want), f"resync-{t.target_id}")
            self._resyncs[t.target_id] = (want, task)
            task.add_done_callback(lambda _t, tid=t.target_id, key=want: self._resync_finished(tid, key, _t))

    def _resync_finished(self, tid: int, key: tuple, task: asyncio.Task) -> None:
        cur = self._resyncs.get(tid)
        if cur is not None and cur[1] is task:
            del self._resyncs[tid]
        if not task.cancelled() and task.exception() is None:
            self._resync_done[tid] = key

    def address_of(self, target_id: int) -> str:
        try:
            return self.routing.address_of(target_id)
        except KeyError:
            raise StatusError(SC.STALE_ROUTING, f"target {target_id} has no known node") from None

    def chunk_lock(self, target: Target, cid: bytes):
        """The replication lock of one chunk on one target (held across forwarding)."""
        return self._locks.hold((target.target_id, cid))

    # ----------------------------------------------------------------- request plumbing

    async def _handle(self, req: net.Request) -> net.Response:
        spec = self._handlers.get(req.method)
        if spec is None:
            reply = S.StorageReplyStatus()
            reply.status.code = SC.INVALID_ARGUMENT
            reply.status.message = f"unknown storage method {req.method}"
            return net.Response(reply.SerializeToString())
        req_cls, reply_cls, fn = spec
        t0 = time.perf_counter()
        try:
            msg = req_cls.FromString(req.header)
        except (DecodeError, ValueError) as e:
            return self._error(reply_cls, SC.INVALID_ARGUMENT,
                               f"malformed {req_cls.__name__} header ({len(req.header)} bytes): {e}")
        if req.reply_buffer is not None:
            _REPLY_BUFFER.set(req.reply_buffer)  # this request's task only
        try:
            reply, payload = await fn(msg, req.payload)
        except StatusError as e:
            return self._error(reply_cls, e.code, e.message, **e.fields)
        except StorageError as e:
            return self._error(reply_cls, e.code, str(e))
        except asyncio.CancelledError:
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return self._error(reply_cls, SC.NO_SPACE, f"no space left on a target's disk: {e}")
            log.exception("storage method %d failed", req.method)
            return self._error(reply_cls, SC.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        except Exception as e:
            log.exception("storage method %d failed", req.method)
            return self._error(reply_cls, SC.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        self.phases.add(f"method.{req.method}", t0)
        return net.Response(reply.SerializeToString(), payload)

    @staticmethod
    def _error(reply_cls, code: int, message: str, **fields) -> net.Response:
        reply = reply_cls(**fields)
        reply.status.code = code
        reply.status.message = message
        return net.Response(reply.SerializeToString())

    def _local_target(self, chain: Chain) -> Target | None:
        for tid in chain.target_ids:
            t = self.targets.get(tid)
            if t is not None:
                return t
        return None

    async def _route(self, chain_id: int, chain_version: int, *, check_version: bool = True
                     ) -> tuple[Target, craq.Role]:
        """The local target of `chain_id` and its role, after the chain version check."""
        chain = self.routing.chains.get(chain_id) if self.routing else None
        if chain is None or (check_version and chain_version > chain.version):
            try:
                await self._refresh_routing()
            except MgmtdError as e:   # answer from what we know
                log.debug("routing refresh failed: %s", e)
            chain = self.routing.chains.get(chain_id) if self.routing else None
            if chain is None:
                raise StatusError(SC.STALE_ROUTING, f"chain {chain_id} is unknown to storage node "
                                  f"{self.node_id}")
        return self._route_in(chain, chain_version, check_version)

    def _route_in(self, chain: Chain, chain_version: int, check_version: bool) -> tuple[Target, craq.Role]:
        target = self._local_target(chain)
        if target is None or target.role is None:
            raise StatusError(SC.STALE_ROUTING, f"storage node {self.node_id} holds no target of "
                              f"chain {chain.chain_id}")
        if check_version:
            check = craq.check_chain_version(chain_version, chain.version)
            if check is craq.ChainCheck.STALE:
                raise StatusError(SC.STALE_ROUTING, f"stale routing: chain {chain.chain_id} is at version "
                                  f"{chain.version}, the request has {chain_version}")
            if check is craq.ChainCheck.BEHIND:
                raise StatusError(SC.STALE_ROUTING, f"target {target.target_id} has chain {chain.chain_id} "
                                  f"at version {chain.version}, older than the request's "
                                  f"{chain_version}; retry shortly")
        return target, target.role

    def _check_lease(self) -> None:
        if not self.lease.valid():
            raise StatusError(SC.NOT_SERVING, f"storage node {self.node_id} has no valid lease from "
                              f"mgmtd (no successful heartbeat for half the lease); not taking updates")

    @staticmethod
    def _update_type(msg: S.UpdateRequest) -> str:
        utype = UPDATE_TYPES.get(msg.type)
        if utype is None:
            raise StatusError(SC.INVALID_ARGUMENT, f"unknown update type {msg.type}")
        if not msg.HasField("chunk"):
            raise StatusError(SC.INVALID_ARGUMENT, "update without a chunk id")
        return utype

    @staticmethod
    def _check_update(msg: S.UpdateRequest, utype: str, payload: memoryview, engine_max: int) -> None:
        if utype == "remove" and not msg.full_chunk:
            if len(payload):
                raise StatusError(SC.INVALID_ARGUMENT, f"a remove carries no payload, got "
                                  f"{len(payload)} bytes")
            return
        if not 0 < msg.chunk_size <= engine_max:
            raise StatusError(SC.INVALID_ARGUMENT, f"chunk size {msg.chunk_size} out of range "
                              f"1..{engine_max}")
        if utype == "write" or msg.full_chunk:
            if len(payload) != msg.length:
                raise StatusError(SC.INVALID_ARGUMENT, f"write of {msg.length} bytes carries a payload "
                                  f"of {len(payload)} bytes")
            if msg.offset + msg.length > msg.chunk_size:
                raise StatusError(SC.INVALID_ARGUMENT, f"write [{msg.offset}, {msg.offset + msg.length}) "
                                  f"is beyond the chunk size {msg.chunk_size}")
            crc = crc32c(payload)
            if crc != msg.crc32c:
                raise StatusError(SC.CHECKSUM_MISMATCH, f"write payload crc32c {crc:08x} does not "
                                  f"match the request's {msg.crc32c:08x}")
        else:
            if len(payload):
                raise StatusError(SC.INVALID_ARGUMENT, f"a truncate carries no payload, got "
                                  f"{len(payload)} bytes")
            if msg.length > msg.chunk_size:
                raise StatusError(SC.INVALID_ARGUMENT, f"truncate to {msg.length} is beyond the chunk "
                                  f"size {msg.chunk_size}")

    # ----------------------------------------------------------------- updates

    async def _on_client_update(self, msg: S.UpdateRequest, payload: memoryview):
        utype = self._update_type(msg)
        if msg.full_chunk or msg.update_version:
            raise StatusError(SC.INVALID_ARGUMENT, "a client update must not carry forwarding fields")
        target, role = await self._route(msg.chain_id, msg.chain_version)
        self._check_update(msg, utype, payload, target.engine.max_chunk_size)
        if not role.is_head:
            raise StatusError(SC.NOT_HEAD, f"target {target.target_id} is not the head of chain "
                              f"{role.chain_id} (the head is target {role.head or 'none'}); "
                              f"send updates to the head", head_target=role.head or 0)
        self._check_lease()
        if utype == "write":
            self._check_space(target, len(payload))
        key = (msg.header.client_id, msg.seq) if msg.seq and msg.header.client_id else None
        fut = None
        if key is not None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            hit = target.dedup.begin(key, fut)
            if hit is not None:
                result = hit.result if hit.waiter is None else await asyncio.shield(hit.waiter)
                return S.UpdateReply(commit_version=result[0], length=result[1]), ()
        result = await self._detached(self._deduped(
            target, key, fut, self._head_update(target, msg, payload, utype)), "update")
        return S.UpdateReply(commit_version=result[0], length=result[1]), ()

    @staticmethod
    async def _deduped(target: Target, key, fut, work, flagged: bool = False):
        """Run `work`, then settle the dedup entry of `key` (registered with `fut`).
        With `flagged`, work returns (result, need_full): a need_full answer settles nothing."""
        try:
            result = await work
        except BaseException as e:
            if fut is not None:
                target.dedup.fail(key)
                fut.cancel() if isinstance(e, asyncio.CancelledError) else fut.set_exception(e)
            raise
        value, need_full = result if flagged else (result, False)
        if key is not None:
            if need_full:
                if fut is not None:
                    target.dedup.fail(key)
                    fut.set_exception(StatusError(SC.BUSY, "update not applied yet; retry"))
            elif fut is not None:
                target.dedup.finish(key, value)
                fut.set_result(value)
            else:
                target.dedup.record(key, value)
        return result

    async def _head_update(self, target: Target, msg: S.UpdateRequest, payload: memoryview,
                           utype: str) -> tuple[int, int]:
        engine = target.engine
        cid = _cid(msg.chunk)
        ph = self.phases
        t = time.perf_counter()
        async with self.chunk_lock(target, cid):
            t = ph.add("head.lock_wait", t)
            role = target.role
            if role is None or not role.is_head:
                raise StatusError(SC.NOT_HEAD, f"target {target.target_id} stopped being the head of "
                                  f"chain {msg.chain_id}", head_target=(role.head or 0) if role else 0)
            fwd = S.UpdateRequest()
            fwd.CopyFrom(msg)
            if utype == "remove":
                await self._forward(target, fwd, (), None)
                await engine.remove([cid])
                return 0, 0
            cv = role.chain_version

            def plan_and_stage(core) -> craq.HeadPlan | None:
                # Look up, plan and stage in one trip to the engine's threads.
                meta = core.get_meta(cid)
                if meta is None:
                    plan = craq.HeadPlan(False, 1, 0)
                else:
                    plan = craq.head_plan(meta.commit_ver, meta.update_ver, meta.has_pending)
                if plan.abort_pending:
                    log.warning("target %d chunk %s: dropping stuck pending version %d (commit %d)",
                                target.target_id, _hexid(cid), meta.update_ver, meta.commit_ver)
                    meta = core.abort(cid)
                if utype == "truncate" and meta is None:
                    return None     # nothing to cut; a missing chunk reads as a hole
                self._stage_sync(core, cid, utype, msg, payload, plan.version, cv)
                if self._alone_in_write_path(target, role):
                    return plan, core.commit(cid, plan.version)
                return plan, None

            # Staged before forwarding, never alongside (on every target): the pending
            # version must exist before any successor commits, so reads here answer
            # "not committed" meanwhile, and it is what burns this version number if
            # the update dies after successors committed it (craq's module docstring).
            staged = await engine.call([cid], plan_and_stage)
            t = ph.add("head.stage", t)
            if staged is None:
                return 0, 0
            plan, m = staged
            if m is not None:
                return m.commit_ver, m.length
            fwd.update_version = plan.version
            fwd.update_chain_version = cv
            fwd.base_version = plan.base_version
            await self._forward(target, fwd, (payload,) if len(payload) else (),
                                lambda: self._full_content(target, cid, plan.base_version, utype,
                                                           msg, payload))
            t = ph.add("head.forward", t)
            m = await engine.commit(cid, plan.version)
            ph.add("head.commit", t)
            return m.commit_ver, m.length

    def _check_space(self, target: Target, nbytes: int) -> None:
        """Refuse a write (NO_SPACE) when the target's disk is below the reserve. The free
        space is read again every 0.5 s (statvfs: no disk I/O) and counted down by the
        writes accepted meanwhile, so a fast writer cannot run far past it."""
        now = time.monotonic()
        if target.free_bytes is None or now - target.free_at > 0.5:
            try:
                st = os.statvfs(target.path)
            except OSError:
                return
            target.free_bytes, target.free_at = st.f_bavail * st.f_frsize, now
        if target.free_bytes - nbytes < self.config.reserve_bytes:
            raise StatusError(SC.NO_SPACE, f"target {target.target_id}: no space left on its disk "
                              f"({target.free_bytes >> 20} MiB free, {self.config.reserve_bytes >> 20} MiB "
                              f"kept for removals and metadata)")
        target.free_bytes -= nbytes

    def _alone_in_write_path(self, target: Target, role: craq.Role) -> bool:
        """Whether an engine thread that just staged an update for `target` may commit it
        at once: `role` (taken when the update started) is still current and has no
        successor, and the lease holds; the same checks `_forward` makes before the
        commit, saving the commit its own trip to the engine's threads."""
        return (target.role is role and role.successor is None and role.on_write_path
                and not self._stopping and self.lease.valid())

    @staticmethod
    def _stage_sync(core, cid: bytes, utype: str, msg: S.UpdateRequest, payload: memoryview,
                    version: int, chain_version: int) -> ChunkMeta:
        """Stage a write or truncate as pending `version` (in an engine thread)."""
        if utype == "write":
            return core.prepare_write(cid, msg.offset, payload, version, chain_version,
                                      chunk_size=msg.chunk_size)
        return core.truncate(cid, msg.length, version, chain_version, chunk_size=msg.chunk_size)

    async def _full_content(self, target: Target, cid: bytes, base_version: int, utype: str,
                            msg: S.UpdateRequest, payload: memoryview) -> bytearray:
        """The chunk's content after this update: committed base + the delta."""
        engine = target.engine
        meta = await engine.get_meta(cid)
        committed = meta.commit_ver if meta else 0
        if committed != base_version:
            raise StatusError(SC.INTERNAL, f"chunk {_hexid(cid)}: base version moved from "
                              f"{base_version} to {committed} under the chunk lock")
        if committed:
            data, _ = await engine.read(cid, 0, meta.length)
        else:
            data = bytearray()
        return await asyncio.to_thread(craq.apply_delta, data, utype, msg.offset, msg.length, payload)

    async def _forward(self, target: Target, fwd: S.UpdateRequest, payload,
                       full: Callable[[], Awaitable[bytearray]] | None) -> S.UpdateReply | None:
        """Send an update to this target's successor until it answers OK.

        Retries (refreshing routing) on transport errors and retryable statuses
        for config.update_retry seconds; `full` produces the whole chunk when
        the successor asks for it. Returns None when this target is the tail.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.update_retry
        delay = 0.02
        while True:
            self._check_lease()
            role = target.role
            if role is None or not role.on_write_path:
                raise StatusError(SC.STALE_ROUTING, f"target {target.target_id} left the write path "
                                  f"of chain {fwd.chain_id}")
            if role.successor is None:
                return None
            succ = role.successor
            fwd.chain_version = role.chain_version
            fwd.to_target = succ
            moved = target.moved
            if moved is None:
                moved = target.moved = loop.create_future()
            try:
                addr = self.address_of(succ)
                rep = await self.pool.call(addr, S.STORAGE_FORWARD, fwd.SerializeToString(), payload,
                                           timeout=self.config.forward_timeout, abort=moved)
                reply = S.UpdateReply.FromString(rep.header)
                code, why = reply.status.code, reply.status.message
            except (net.TransportError, StatusError, DecodeError) as e:
                reply, code, why = None, -1, str(e)
            if reply is not None:
                if code == SC.OK:
                    return reply
                if reply.need_full_chunk and not fwd.full_chunk and full is not None:
                    data = await full()
                    fwd.full_chunk = True
                    fwd.type = S.UPDATE_WRITE
                    fwd.offset = 0
                    fwd.length = len(data)
                    fwd.crc32c = crc32c(data)
                    payload = (data,) if len(data) else ()
                    continue
                if code not in _RETRY_FORWARD:
                    raise StatusError(code, f"successor target {succ}: {why}")
            if loop.time() >= deadline or self._stopping:
                raise StatusError(SC.BUSY, f"target {target.target_id} could not forward to its "
                                  f"successor target {succ}: {why}")
            log.debug("forward to target %d failed (%s); retrying", succ, why)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            try:
                await self._refresh_routing()
            except MgmtdError as e:
                log.debug("routing refresh failed: %s", e)

    async def _on_forward(self, msg: S.UpdateRequest, payload: memoryview):
        utype = self._update_type(msg)
        target, role = await self._route(msg.chain_id, msg.chain_version)
        self._check_update(msg, utype, payload, target.engine.max_chunk_size)
        if msg.to_target != target.target_id:
            raise StatusError(SC.STALE_ROUTING, f"forward for target {msg.to_target} reached target "
                              f"{target.target_id}")
        if not role.on_write_path or role.predecessor is None:
            raise StatusError(SC.STALE_ROUTING, f"target {target.target_id} takes no forwarded updates "
                              f"in chain {role.chain_id} v{role.chain_version} "
                              f"({role.state.name if role.state else 'not a member'})")
        if not msg.update_version and utype != "remove":
            raise StatusError(SC.INVALID_ARGUMENT, "a forwarded update needs its update version")
        self._check_lease()
        if utype == "write":
            self._check_space(target, len(payload))
        key = (msg.header.client_id, msg.seq) if msg.seq and msg.header.client_id else None
        fut = None
        if key is not None and target.dedup.get(key) is None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            target.dedup.begin(key, fut)
        result, need_full = await self._detached(self._deduped(
            target, key, fut, self._successor_update(target, msg, payload, utype), True), "forward")
        if need_full:
            return S.UpdateReply(status=common_pb2.Status(
                code=SC.BUSY, message=f"target {target.target_id} is missing earlier updates of chunk "
                                      f"{_hexid(_cid(msg.chunk))}; send the full chunk"),
                need_full_chunk=True), ()
        return S.UpdateReply(commit_version=result[0], length=result[1]), ()

    async def _successor_update(self, target: Target, msg: S.UpdateRequest, payload: memoryview,
                                utype: str) -> tuple[tuple[int, int], bool]:
        engine = target.engine
        cid = _cid(msg.chunk)
        ph = self.phases
        t = time.perf_counter()
        async with self.chunk_lock(target, cid):
            t = ph.add("succ.lock_wait", t)
            fwd = S.UpdateRequest()
            fwd.CopyFrom(msg)
            if utype == "remove":
                await self._forward(target, fwd, (), None)
                await engine.remove([cid])
                return (0, 0), False
            role = target.role
            tail = role is not None and role.successor is None
            v, cv = msg.update_version, msg.update_chain_version

            def decide_and_stage(core):
                # One trip to the engine's threads: look up, decide, stage, and at the
                # tail commit too. The stage comes before forwarding (never alongside):
                # a pending version must exist here before any successor can commit,
                # or a read here could return an older version than the tail already
                # served (and a crash could leave no trace of the update here).
                meta = core.get_meta(cid)
                action = craq.forward_action(
                    exists=meta is not None, commit_ver=meta.commit_ver if meta else 0,
                    has_pending=bool(meta and meta.has_pending),
                    commit_chain_ver=meta.chain_ver if meta else 0,
                    update_type=utype, update_ver=v, update_chain_ver=cv, base_ver=msg.base_version,
                    full=msg.full_chunk)
                if action is craq.ForwardAction.APPLY_DELTA:
                    try:
                        self._stage_sync(core, cid, utype, msg, payload, v, cv)
                    except (ChunkCorrupted, VersionError) as e:
                        log.info("target %d chunk %s: cannot apply delta v%d (%s); asking for the "
                                 "full chunk", target.target_id, _hexid(cid), v, e)
                        return craq.ForwardAction.NEED_FULL, None, None
                elif action is craq.ForwardAction.APPLY_FULL:
                    core.would_block()      # several steps: on an engine thread, never the loop
                    if self._apply_full_sync(core, cid, meta, payload, v, cv, msg.crc32c, msg.chunk_size):
                        return action, core.get_meta(cid), "installed"
                else:
                    return action, meta, None
                if tail and self._alone_in_write_path(target, role):
                    return action, core.commit(cid, v), "committed"
                return action, None, None

            action, m, done = await engine.call([cid], decide_and_stage)
            t = ph.add("succ.stage", t)
            if action is craq.ForwardAction.NEED_FULL:
                return (0, 0), True
            if action is craq.ForwardAction.DUPLICATE or done == "committed":
                return (m.commit_ver, m.length), False
            if done == "installed":
                # Installed as committed (a full chunk that could not be staged): forward
                # it, then answer with what is installed (the chunk lock keeps it so).
                await self._forward(target, fwd, (payload,) if len(payload) else (), None)
                return (m.commit_ver, m.length), False
            full = None
            if action is craq.ForwardAction.APPLY_DELTA:
                full = (lambda: self._full_content(target, cid, msg.base_version, utype, msg, payload))
            await self._forward(target, fwd, (payload,) if len(payload) else (), full)
            t = ph.add("succ.forward", t)
            m = await engine.commit(cid, v)
            ph.add("succ.commit", t)
            return (m.commit_ver, m.length), False

    @staticmethod
    def _apply_full_sync(core, cid: bytes, meta: ChunkMeta | None, data: memoryview,
                         version: int, chain_version: int, crc: int, chunk_size: int) -> bool:
        """Make `data` the chunk's content at `version` (in an engine thread): as a
        pending version when possible (truncate to 0, then write everything, so no
        damaged old block is read), else installed as committed. Returns True when
        installed."""
        if meta is not None and meta.has_pending:
            meta = core.abort(cid)
        if meta is None or (version > meta.commit_ver and chain_version >= meta.chain_ver):
            try:
                if meta is not None:
                    core.truncate(cid, 0, version, chain_version, chunk_size=chunk_size)
                core.prepare_write(cid, 0, data, version, chain_version, chunk_size=chunk_size)
                return False
            except VersionError:
                core.abort(cid)
        core.install(cid, data, ChunkMeta(chunk_id=cid, commit_ver=version, update_ver=version,
                                          chain_ver=chain_version, length=len(data), crc=crc))
        return True

    # ----------------------------------------------------------------- remove chunks

    async def _on_remove_chunks(self, msg: S.RemoveChunksRequest, payload: memoryview):
        if len(payload):
            raise StatusError(SC.INVALID_ARGUMENT, "remove chunks carries no payload")
        target, role = await self._route(msg.chain_id, msg.chain_version)
        if not role.is_head:
            raise StatusError(SC.NOT_HEAD, f"target {target.target_id} is not the head of chain "
                              f"{role.chain_id}", head_target=role.head or 0)
        if msg.end_index and msg.end_index <= msg.begin_index:
            return S.RemoveChunksReply(removed=0, more=False), ()
        self._check_lease()
        prefix = craq.inode_prefix(msg.inode)
        limit = msg.max_chunks or (1 << 32)
        cids: list[bytes] = []
        more = False
        async for m in target.engine.list_metas(prefix, page=1024):
            _, index = craq.parse_chunk_id(m.chunk_id)
            if index < msg.begin_index:
                continue
            if msg.end_index and index >= msg.end_index:
                break
            if len(cids) >= limit:
                more = True
                break
            cids.append(m.chunk_id)
        sem = asyncio.Semaphore(16)

        async def one(cid: bytes) -> None:
            inode, index = craq.parse_chunk_id(cid)
            req = S.UpdateRequest(header=msg.header, chain_id=msg.chain_id,
                                  chain_version=msg.chain_version, type=S.UPDATE_REMOVE,
                                  chunk=S.ChunkId(inode=inode, index=index),
                                  chunk_size=target.engine.max_chunk_size)
            async with sem:
                await self._head_update(target, req, memoryview(b""), "remove")

        await asyncio.gather(*(one(c) for c in cids))
        return S.RemoveChunksReply(removed=len(cids), more=more), ()

    # ----------------------------------------------------------------- reads

    async def _on_batch_read(self, msg: S.BatchReadRequest, payload: memoryview):
        pieces = msg.pieces
        if len(pieces) > MAX_READ_PIECES:
            raise StatusError(SC.INVALID_ARGUMENT, f"batch read of {len(pieces)} pieces exceeds the "
                              f"limit of {MAX_READ_PIECES}")
        lengths = [p.length for p in pieces]
        total = sum(lengths)
        limit = self._server.max_payload if self._server else net.MAX_PAYLOAD
        if total > limit:
            raise StatusError(SC.INVALID_ARGUMENT, f"batch read of {total} bytes exceeds the "
                              f"{limit}-byte reply limit; split it")
        # Straight into the client's shared-memory reply slice when it offered one.
        rb = _REPLY_BUFFER.get()
        buf = (np.frombuffer(rb, np.uint8)[:total] if rb is not None and len(rb) >= total
               else self._buffers.get(total))
        offsets = craq.slot_offsets(lengths)
        results: list[S.ReadResult | None] = [None] * len(pieces)

        async def one(i: int) -> None:
            start, n = offsets[i], lengths[i]
            try:
                r = results[i] = await self._read_piece(pieces[i], buf[start:start + n],
                                                        msg.allow_any_state)
                got = r.length
            except (StatusError, StorageError) as e:
                results[i], got = _failed_read(e), 0
            if got < n:
                buf[start + got:start + n] = 0    # pooled memory: never send stale bytes

        if len(pieces) == 1:
            await one(0)
        else:
            await asyncio.gather(*(one(i) for i in range(len(pieces))))
        return S.BatchReadReply(results=results), ((buf,) if total else ())

    async def _read_piece(self, p: S.ReadPiece, slot: memoryview, any_state: bool) -> S.ReadResult:
        target, role = await self._route(p.chain_id, p.chain_version, check_version=not any_state)
        self._check_readable(target, role, any_state)
        cid = _cid(p.chunk)
        t = time.perf_counter()
        with _read_errors(role, any_state):
            n, meta = await target.engine.read(cid, p.offset, p.length, slot)
        self.phases.add("read.engine", t)
        return self._read_result(cid, target, role, n, meta, any_state)

    @staticmethod
    def _check_readable(target: Target, role: craq.Role, any_state: bool) -> None:
        if not any_state and not role.readable:
            raise StatusError(SC.NOT_SERVING, f"target {target.target_id} of chain {role.chain_id} is "
                              f"{role.state.name if role.state else 'not a member'}, not serving reads")

    @staticmethod
    def _read_result(cid: bytes, target: Target, role: craq.Role, n: int, meta: ChunkMeta,
                     any_state: bool) -> S.ReadResult:
        if meta.has_pending and not role.is_read_tail and not any_state:
            raise StatusError(SC.NOT_COMMITTED, f"chunk {_hexid(cid)} has a pending version "
                              f"{meta.update_ver} on target {target.target_id}; read from the tail")
        return S.ReadResult(length=n, commit_version=meta.commit_ver, chunk_length=meta.length)

    def _inline(self, req: net.Request) -> net.Response | None:
        """A batch read of one small piece whose bytes are in the page cache, answered on
        the loop with no task of its own (net.serve's `inline`); None (run `_handle`)
        for everything else: other methods, a routing refresh needed, bytes on disk."""
        if req.method != S.STORAGE_BATCH_READ or req.reply_buffer is not None or self.routing is None:
            return None
        try:
            msg = S.BatchReadRequest.FromString(req.header)
        except (DecodeError, ValueError):
            return None     # _handle answers with the error
        if len(msg.pieces) != 1 or not 0 < msg.pieces[0].length <= NOWAIT_MAX:
            return None
        p = msg.pieces[0]
        any_state = msg.allow_any_state
        chain = self.routing.chains.get(p.chain_id)
        if chain is None or (not any_state and p.chain_version > chain.version):
            return None
        buf = self._buffers.get(p.length)
        try:
            target, role = self._route_in(chain, p.chain_version, not any_state)
            self._check_readable(target, role, any_state)
            cid = _cid(p.chunk)
            with _read_errors(role, any_state):
                n, meta = target.engine.read_now(cid, p.offset, p.length, buf)
            result = self._read_result(cid, target, role, n, meta, any_state)
        except WouldBlock:
            return None
        except (StatusError, StorageError) as e:
            result, n = _failed_read(e), 0
        if n < p.length:
            buf[n:p.length] = 0     # pooled memory: never send stale bytes
        return net.Response(S.BatchReadReply(results=[result]).SerializeToString(), (buf,))

    async def _on_query_last_chunk(self, msg: S.QueryLastChunkRequest, payload: memoryview):
        target, role = await self._route(msg.chain_id, msg.chain_version)
        if not role.readable:
            raise StatusError(SC.NOT_SERVING, f"target {target.target_id} is not serving reads")
        found = await target.engine.query_last_chunk(craq.inode_prefix(msg.inode))
        if found is None:
            return S.QueryLastChunkReply(found=False), ()
        cid, length = found
        _, index = craq.parse_chunk_id(cid)
        return S.QueryLastChunkReply(found=True, index=index, length=length), ()

    async def _on_flush(self, msg: S.FlushRequest, payload: memoryview):
        wanted = set(msg.chain_ids)
        targets = [t for t in self.targets.values() if not wanted or t.chain_id in wanted]
        n, files = await self.flush_targets(targets)
        return S.FlushReply(targets_flushed=n, files_synced=files), ()

    async def _on_dump(self, msg: S.DumpChunkMetaRequest, payload: memoryview):
        target = self.targets.get(msg.target_id)
        if target is None:
            raise StatusError(SC.NOT_FOUND, f"target {msg.target_id} is not on storage node "
                              f"{self.node_id} (it has {sorted(self.targets)})")
        limit = min(msg.limit or 1024, MAX_DUMP_PAGE)
        prefix = craq.inode_prefix(msg.inode) if msg.has_inode else b""
        after = _cid(msg.start_after) if msg.has_start else None
        # One page through the engine's own pool (its close() waits for it).
        metas = await target.engine.list_page(prefix, after, limit + 1)
        more = len(metas) > limit
        out = []
        for m in metas[:limit]:
            if len(m.chunk_id) != craq.CHUNK_ID_LEN:
                continue
            out.append(meta_to_proto(m))
        return S.DumpChunkMetaReply(metas=out, more=more), ()

    # ----------------------------------------------------------------- resync (receiving side)

    async def _sync_target(self, chain_id: int, chain_version: int, target_id: int) -> Target:
        target, role = await self._route(chain_id, chain_version)
        if target.target_id != target_id:
            raise StatusError(SC.STALE_ROUTING, f"resync for target {target_id} reached target "
                              f"{target.target_id}")
        if role.state is not PublicState.SYNCING:
            raise StatusError(SC.STALE_ROUTING, f"target {target_id} is "
                              f"{role.state.name if role.state else 'not a member'}, not SYNCING")
        return target

    async def _on_sync_install(self, msg: S.SyncInstallRequest, payload: memoryview):
        target = await self._sync_target(msg.chain_id, msg.chain_version, msg.target_id)
        m = msg.meta
        if len(payload) != m.length:
            raise StatusError(SC.INVALID_ARGUMENT, f"install of {m.length} bytes carries {len(payload)}")
        if m.commit_version < 1:
            raise StatusError(SC.INVALID_ARGUMENT, "install needs a commit version >= 1")
        cid = _cid(m.chunk)
        async with self.chunk_lock(target, cid):
            await target.engine.install(cid, payload, ChunkMeta(
                chunk_id=cid, commit_ver=m.commit_version, update_ver=m.commit_version,
                chain_ver=m.chain_version, length=m.length, crc=m.crc32c))
        return S.SyncInstallReply(), ()

    async def _on_sync_remove(self, msg: S.SyncRemoveRequest, payload: memoryview):
        target = await self._sync_target(msg.chain_id, msg.chain_version, msg.target_id)
        cids = sorted({_cid(c) for c in msg.chunks})
        removed = 0
        for cid in cids:
            async with self.chunk_lock(target, cid):
                removed += await target.engine.remove([cid])
        return S.SyncRemoveReply(removed=removed), ()

    async def _on_sync_done(self, msg: S.SyncDoneRequest, payload: memoryview):
        target = await self._sync_target(msg.chain_id, msg.chain_version, msg.target_id)
        target.synced_version = msg.chain_version
        log.info("target %d resynced at chain %d v%d (%d chunks installed, %d removed)",
                 target.target_id, msg.chain_id, msg.chain_version, msg.chunks_sent, msg.chunks_removed)
        self._hb_wakeup.set()
        return S.SyncDoneReply(), ()


# --------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="flyfs storage",
        description="Run a storage daemon serving one target per data directory.",
        epilog="example: flyfs storage --mgmtd 127.0.0.1:8000 --data /data/t0,/data/t1 "
               "--listen 127.0.0.1:9000")
    p.add_argument("--mgmtd", default=env("FLYFS_MGMTD"), required=env("FLYFS_MGMTD") is None,
                   help="mgmtd address(es), HOST:PORT[,HOST:PORT...] (env FLYFS_MGMTD)")
    p.add_argument("--data", default=env("FLYFS_STORAGE_DATA"), required=env("FLYFS_STORAGE_DATA") is None,
                   help="comma-separated target directories (env FLYFS_STORAGE_DATA)")
    p.add_argument("--listen", default=env("FLYFS_STORAGE_LISTEN", "127.0.0.1:0"),
                   help="HOST:PORT for the data plane (env FLYFS_STORAGE_LISTEN; default %(default)s)")
    p.add_argument("--advertise", default=env("FLYFS_STORAGE_ADVERTISE"),
                   help="address to register, if not the listen address")
    p.add_argument("--cluster-id", default=env("FLYFS_CLUSTER_ID", ""),
                   help="expected cluster id (default: whatever mgmtd says)")
    p.add_argument("--max-chunk-size", type=int, default=None,
                   help="largest chunk a target accepts, bytes (default: the engine's 64 MiB)")
    p.add_argument("--engine-workers", type=int, default=int(env("FLYFS_STORAGE_ENGINE_WORKERS", "8")),
                   help="disk I/O threads per target (env FLYFS_STORAGE_ENGINE_WORKERS; default %(default)s)")
    p.add_argument("--sync-writes", action=argparse.BooleanOptionalAction,
                   default=env("FLYFS_STORAGE_SYNC_WRITES", "0") not in ("0", "", "no", "false"),
                   help="fdatasync every update before acknowledging it (env FLYFS_STORAGE_SYNC_WRITES; "
                        "default: no: replicas hold updates in the kernel, disks are synced every "
                        "--flush-interval and when a client fsyncs)")
    p.add_argument("--flush-interval", type=float, default=float(env("FLYFS_STORAGE_FLUSH_INTERVAL", "5")),
                   help="seconds between background syncs of unsynced updates (default %(default)s)")
    p.add_argument("--inline-max", type=int, default=int(env("FLYFS_STORAGE_INLINE_MAX", str(64 * 1024))),
                   help="chunks of at most this many bytes keep their data in the target's metadata "
                        "store instead of a file (at most the block size, 64 KiB; 0: never; "
                        "default %(default)s)")
    p.add_argument("--reserve", type=int, default=int(env("FLYFS_STORAGE_RESERVE", str(64 << 20))),
                   help="bytes kept free on each target's disk: writes get ENOSPC below it, removals "
                        "go on (default %(default)s)")
    p.add_argument("--log-level", default=env("FLYFS_LOG_LEVEL", "INFO"))
    return p


async def _serve(args) -> None:
    if args.flush_interval < 0:
        raise ValueError(f"--flush-interval must be >= 0, got {args.flush_interval}")
    if args.inline_max < 0:
        raise ValueError(f"--inline-max must be >= 0, got {args.inline_max}")
    if args.reserve < 0:
        raise ValueError(f"--reserve must be >= 0, got {args.reserve}")
    config = StorageConfig(max_chunk_size=args.max_chunk_size, engine_workers=args.engine_workers,
                           sync_writes=args.sync_writes, flush_interval=args.flush_interval,
                           inline_max=args.inline_max, reserve_bytes=args.reserve)
    dirs = [d for d in args.data.split(",") if d.strip()]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    server = StorageServer(args.mgmtd, dirs, args.listen, cluster_id=args.cluster_id, config=config,
                           advertise=args.advertise)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"storage listening on {server.address} node {server.node_id} "
          f"targets {','.join(str(t) for t in sorted(server.targets))}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """`flyfs storage --mgmtd ADDR --data DIR[,DIR...] --listen HOST:PORT` until SIGINT/SIGTERM."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import uvloop
    try:
        uvloop.run(_serve(args))
    except (OSError, ValueError, RuntimeError, StorageError) as e:
        print(f"flyfs storage: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
