"""Conversions between the service's dataclasses and the meta.proto messages
(shared by the gRPC server and flyfs.client.meta_client)."""
from __future__ import annotations

from ..proto import common_pb2, meta_pb2
from .attrs import NOW
from .perm import Caller
from .schema import DirEntry, Inode, Layout, join_ns, split_ns


def timespec(t: int) -> meta_pb2.Timespec:
    sec, nsec = split_ns(t)
    return meta_pb2.Timespec(sec=sec, nsec=nsec)


def from_timespec(ts: meta_pb2.Timespec) -> int:
    return join_ns(ts.sec, ts.nsec)


def layout_msg(lay: Layout) -> meta_pb2.Layout:
    return meta_pb2.Layout(chunk_size=lay.chunk_size, stripe=lay.stripe,
                           chain_table_version=lay.chain_table_version, seed=lay.seed,
                           chains=lay.chains)


def attr_msg(n: Inode) -> meta_pb2.Attr:
    return meta_pb2.Attr(ino=n.ino, mode=n.mode, uid=n.uid, gid=n.gid, nlink=n.nlink, size=n.size,
                         atime=timespec(n.atime), mtime=timespec(n.mtime), ctime=timespec(n.ctime),
                         rdev=n.rdev, parent=n.parent, layout=layout_msg(n.layout), target=n.target)


def inode_of(a: meta_pb2.Attr) -> Inode:
    lay = a.layout
    return Inode(a.ino, a.mode, a.uid, a.gid, a.nlink, a.size, from_timespec(a.atime),
                 from_timespec(a.mtime), from_timespec(a.ctime), a.rdev, a.parent,
                 Layout(lay.chunk_size, lay.stripe, lay.chain_table_version, lay.seed, tuple(lay.chains)),
                 a.target)


def entry_msg(e: DirEntry) -> meta_pb2.DirEntry:
    m = meta_pb2.DirEntry(name=e.name, ino=e.ino, type=e.type)
    if e.attr is not None:
        m.attr.CopyFrom(attr_msg(e.attr))
    return m


def entry_of(m: meta_pb2.DirEntry) -> DirEntry:
    return DirEntry(m.name, m.ino, m.type, inode_of(m.attr) if m.HasField("attr") else None)


def timeset_msg(t) -> meta_pb2.TimeSet:
    if t is None:
        return meta_pb2.TimeSet()
    if t == NOW:
        return meta_pb2.TimeSet(set=True, now=True)
    return meta_pb2.TimeSet(set=True, time=timespec(t))


def timeset_of(m: meta_pb2.TimeSet):
    if not m.set:
        return None
    return NOW if m.now else from_timespec(m.time)


def header(who: Caller, uuid: bytes = b"", cluster_id: str = "") -> common_pb2.RequestHeader:
    return common_pb2.RequestHeader(cluster_id=cluster_id, uid=who.uid, gids=who.gids,
                                    client_id=who.client_id, request_uuid=uuid or who.request_uuid)


def caller_of(h: common_pb2.RequestHeader) -> Caller:
    return Caller(h.uid, tuple(h.gids), h.client_id, h.request_uuid)
