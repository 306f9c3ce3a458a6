"""Garbage collection: chunks of deleted files, dead write sessions, old idempotency records.

Removing the last link of a file (with no write session left) puts its id in
the MG queue in the same transaction. A GC pass takes a batch from the queue,
asks storage to remove the files' chunks, then deletes the inodes and their
queue entries; passes follow one another while the queue is full, so a mass
deletion frees its space at once, not a batch per interval. Every step is
idempotent, so a pass that fails half-way (storage down, server killed) is
simply repeated, and two servers may collect at once.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass

from . import schema as s
from .common import GET_MANY_CHUNK, Ctx, has_sessions, remove_inode
from .sessions import expire_sessions

log = logging.getLogger("flyfs.meta")
_STORAGE_CONCURRENCY = 8    # files whose chunks are being removed at once
_FINISH_BATCH = 16          # inodes deleted per transaction


@dataclass
class GcReport:
    inodes: int = 0           # inodes deleted
    chunks: int = 0           # chunks storage reported removed
    sessions: int = 0         # dead write sessions dropped
    records: int = 0          # idempotency records expired
    errors: int = 0           # queue entries left for the next pass
    resume: bytes | None = None  # the queue goes on after this key (a full batch was taken)

    @property
    def idle(self) -> bool:
        return not (self.inodes or self.sessions or self.records or self.errors)


async def collect(ctx: Ctx, report: GcReport, limit: int, after: bytes | None = None) -> None:
    """Collect up to `limit` queued files: their inodes read in one transaction, their
    chunks removed from storage concurrently, then the inodes whose chunks are gone
    deleted (with their queue entries), _FINISH_BATCH per transaction. The queue is
    read from past `after`; `report.resume` says where a next pass goes on."""
    async def scan(txn):
        b, e = (after + b"\x00") if after else s.P_GC, s.prefix_end(s.P_GC)
        keys = [k async for k, _ in txn.snapshot_get_range(b, e, limit=limit)]
        inos = [s.ino_of(k) for k in keys]
        want = [k for ino in inos for k in (s.inode_key(ino), s.inline_key(ino))]
        raws = []
        for i in range(0, len(want), GET_MANY_CHUNK):
            raws += await txn.get_many(want[i:i + GET_MANY_CHUNK], snapshot=True)
        return keys, raws

    keys, raws = await ctx.transact(scan)
    report.resume = keys[-1] if len(keys) == limit else None
    queued = []
    for i, ino in enumerate(s.ino_of(k) for k in keys):
        raw, inline = raws[2 * i], raws[2 * i + 1]
        node = None if raw is None else s.decode_inode(ino, raw)
        if inline is not None and s.decode_inline(inline)[0] == 0:
            node = None  # inline and never spilled: no chunk anywhere
        queued.append((ino, node))
    if not queued:
        return
    gate = asyncio.Semaphore(_STORAGE_CONCURRENCY)

    async def remove_chunks(ino, node) -> bool:
        if node is None or not node.is_reg or ctx.storage is None:
            return True
        async with gate:
            try:
                report.chunks += await ctx.storage.remove_chunks(ino, node.layout)
                return True
            except Exception as e:  # storage unreachable: leave it queued
                report.errors += 1
                log.warning("GC: cannot remove the chunks of inode %d: %s", ino, e)
                return False

    done = await asyncio.gather(*(remove_chunks(ino, node) for ino, node in queued))
    gone = [ino for (ino, _), ok in zip(queued, done) if ok]

    async def finish(txn, gone):
        keys = [k for ino in gone for k in (s.gc_key(ino), s.inode_key(ino))]
        values = await txn.get_many(keys)
        deleted = 0
        for i, ino in enumerate(gone):
            queued_raw, raw = values[2 * i], values[2 * i + 1]
            if queued_raw is None:
                continue  # another server finished it
            txn.clear(s.gc_key(ino))
            if raw is None:
                continue
            if s.decode_inode(ino, raw).nlink > 0 or await has_sessions(txn, ino):
                log.error("GC: inode %d was queued but is still linked or open; not deleting", ino)
                continue
            await remove_inode(txn, ino)
            deleted += 1
        return deleted

    # A few inodes per transaction: each is 4 writes and 3 reads (etcd takes 128 per Txn).
    for i in range(0, len(gone), _FINISH_BATCH):
        part = gone[i:i + _FINISH_BATCH]
        report.inodes += await ctx.transact(lambda txn, part=part: finish(txn, part))


async def expire_records(ctx: Ctx, report: GcReport, batch: int = 50) -> None:
    horizon = ctx.now() - int(ctx.config.idempotency_ttl * 1e9)
    end = s.P_IDEM_EXPIRY + struct.pack(">Q", max(horizon, 0))
    while True:
        async def fn(txn):
            n = 0
            async for k, _ in txn.snapshot_get_range(s.P_IDEM_EXPIRY, end, limit=batch):
                txn.clear(k)
                txn.clear(s.idem_key(k[len(s.P_IDEM_EXPIRY) + 8:]))
                n += 1
            return n

        n = await ctx.transact(fn)
        report.records += n
        if n < batch:
            return


async def run_gc_once(ctx: Ctx, after: bytes | None = None) -> GcReport:
    """One pass: expire dead sessions, collect a batch of deleted files, expire old
    records. With `after` (a previous pass's `resume`) it continues that round: only
    the files queued past it, the sessions and records were done at its start."""
    report = GcReport()
    if after is None:
        report.sessions = await expire_sessions(ctx, ctx.config.gc_batch)
    await collect(ctx, report, ctx.config.gc_batch, after)
    if after is None:
        await expire_records(ctx, report)
    return report
