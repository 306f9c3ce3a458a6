"""Garbage collection: chunks of deleted files, dead write sessions, old idempotency records.

Removing the last link of a file (with no write session left) puts its id in
the MG queue in the same transaction. A GC pass takes a batch from the queue,
asks storage to remove the file's chunks, then deletes the inode and the
queue entry in one transaction. Every step is idempotent, so a pass that
fails half-way (storage down, server killed) is simply repeated, and two
servers may collect at once.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from . import schema as s
from .common import Ctx, has_sessions, remove_inode
from .sessions import expire_sessions

log = logging.getLogger("flyfs.meta")


@dataclass
class GcReport:
    inodes: int = 0           # inodes deleted
    chunks: int = 0           # chunks storage reported removed
    sessions: int = 0         # dead write sessions dropped
    records: int = 0          # idempotency records expired
    errors: int = 0           # queue entries left for the next pass

    @property
    def idle(self) -> bool:
        return not (self.inodes or self.sessions or self.records or self.errors)


async def collect(ctx: Ctx, report: GcReport, limit: int) -> None:
    async def scan(txn):
        b, e = s.P_GC, s.prefix_end(s.P_GC)
        return [s.ino_of(k) async for k, _ in txn.snapshot_get_range(b, e, limit=limit)]

    for ino in await ctx.transact(scan):
        async def peek(txn, ino=ino):
            raw = await txn.snapshot_get(s.inode_key(ino))
            return None if raw is None else s.decode_inode(ino, raw)

        node = await ctx.transact(peek)
        if node is not None and node.is_reg and ctx.storage is not None:
            try:
                report.chunks += await ctx.storage.remove_chunks(ino, node.layout)
            except Exception as e:  # storage unreachable: leave it queued
                report.errors += 1
                log.warning("GC: cannot remove the chunks of inode %d: %s", ino, e)
                continue

        async def finish(txn, ino=ino):
            if await txn.get(s.gc_key(ino)) is None:
                return False  # another server finished it
            txn.clear(s.gc_key(ino))
            raw = await txn.get(s.inode_key(ino))
            if raw is None:
                return False
            if s.decode_inode(ino, raw).nlink > 0 or await has_sessions(txn, ino):
                log.error("GC: inode %d was queued but is still linked or open; not deleting", ino)
                return False
            remove_inode(txn, ino)
            return True

        if await ctx.transact(finish):
            report.inodes += 1


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


async def run_gc_once(ctx: Ctx) -> GcReport:
    """One pass: expire dead sessions, collect a batch of deleted files, expire old records."""
    report = GcReport()
    report.sessions = await expire_sessions(ctx, ctx.config.gc_batch)
    await collect(ctx, report, ctx.config.gc_batch)
    await expire_records(ctx, report)
    return report
