"""Pure parts of the metadata service: key schema, value encodings, permission rules, flags."""
import asyncio
import errno
import os
import stat
import tracemalloc

import pytest

from flyfs.kv import open_engine
from flyfs.metaserver import schema as s
from flyfs.metaserver.perm import R_OK, W_OK, X_OK, Caller, allowed, kill_suid, new_owner
from flyfs.metaserver.schema import Inode, Layout
from flyfs.metaserver.sessions import parse_flags
from meta_fixtures import ROOT, ROOT_INO, make_service

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def node(**kw):
    base = dict(ino=5, mode=stat.S_IFREG | 0o644, uid=1, gid=2, nlink=1, size=0, atime=0, mtime=0, ctime=0)
    base.update(kw)
    return Inode(**base)


def test_inode_round_trip_extremes():
    n = Inode(ino=(1 << 64) - 1, mode=stat.S_IFLNK | 0o777, uid=2**32 - 2, gid=7, nlink=2**32 - 1,
              size=(1 << 63) - 1, atime=I64_MIN * s.NS, mtime=I64_MAX * s.NS + 999_999_999,
              ctime=-1, rdev=(1 << 64) - 1, parent=3,
              layout=Layout(1 << 30, 3, 9, 2, (4, 5, 2**32 - 1)), target=b"/a/b" * 100)
    assert s.decode_inode(n.ino, s.encode_inode(n)) == n
    d = node(mode=stat.S_IFDIR | 0o755, layout=Layout(1 << 20, 4))
    raw = s.encode_inode(d)
    assert len(raw) == 95 and s.decode_inode(5, raw) == d   # compact: 95 bytes for a directory
    with pytest.raises(ValueError):
        s.decode_inode(5, b"\x02" + raw[1:])


def test_keys_spread_and_group():
    assert s.inode_key(1) == b"MI\x01" + b"\x00" * 7            # little-endian ids
    assert s.inode_key(256)[2:] == (256).to_bytes(8, "little")
    b, e = s.dentry_range(0x1FF)
    inside = [s.dentry_key(0x1FF, n) for n in (b"a", b"\xff" * 255, b"\x00")]
    outside = [s.dentry_key(0x200, b"a"), s.dentry_key(0x1FE, b"\xff"), s.inode_key(0x1FF)]
    assert all(b <= k < e for k in inside) and not any(b <= k < e for k in outside)
    assert s.ino_of(s.dentry_key(77, b"x")) == 77
    assert s.prefix_end(b"M\xff\xff") == b"N"
    assert s.decode_dentry(s.encode_dentry(9, stat.S_IFDIR)) == (9, stat.S_IFDIR)
    assert s.decode_stamp(s.encode_stamp(-5, I64_MAX * s.NS)) == (-5, I64_MAX * s.NS)
    ks = s.session_key(3, b"s" * 16)
    got = s.decode_session(ks, s.encode_session(10, 20, "client-é"))
    assert (got.ino, got.session, got.opened, got.deadline, got.client_id) == (3, b"s" * 16, 10, 20, "client-é")
    assert s.idem_expiry_key(1, b"u") < s.idem_expiry_key(256, b"a")   # expiry index sorts by time


def test_layout_chain_of():
    lay = Layout(1 << 20, 3, 1, 2, (10, 20, 30))
    assert [lay.chain_of(i) for i in range(5)] == [30, 10, 20, 30, 10]
    with pytest.raises(ValueError):
        Layout(1 << 20, 4).chain_of(0)


def test_permission_matrix():
    f = node(mode=stat.S_IFREG | 0o640, uid=10, gid=20)
    owner, member, other, root = Caller(10, (10,)), Caller(11, (11, 20)), Caller(12, (12,)), Caller(0, ())
    assert allowed(f, owner, R_OK | W_OK) and not allowed(f, owner, X_OK)
    assert allowed(f, member, R_OK) and not allowed(f, member, W_OK)
    assert not allowed(f, other, R_OK)
    assert allowed(f, root, R_OK | W_OK) and not allowed(f, root, X_OK)
    assert allowed(node(mode=stat.S_IFREG | 0o001), root, X_OK)
    assert allowed(node(mode=stat.S_IFDIR | 0o000), root, X_OK)
    # The owner class decides even when the group or others would allow more.
    assert not allowed(node(mode=stat.S_IFREG | 0o077, uid=10), owner, R_OK)


def test_new_owner_and_kill_suid():
    sgid_dir = node(mode=stat.S_IFDIR | 0o2775, gid=50)
    assert new_owner(sgid_dir, Caller(7, (7,)), stat.S_IFDIR | 0o755) == (7, 50, stat.S_IFDIR | 0o2755)
    assert new_owner(sgid_dir, Caller(7, (7,)), stat.S_IFREG | 0o2755) == (7, 50, stat.S_IFREG | 0o755)
    assert new_owner(sgid_dir, Caller(7, (7, 50)), stat.S_IFREG | 0o2755)[2] & stat.S_ISGID
    assert new_owner(node(mode=stat.S_IFDIR | 0o777, gid=50), Caller(7, (8, 9)), stat.S_IFREG)[1] == 8
    assert kill_suid(stat.S_IFREG | 0o6755) == stat.S_IFREG | 0o755
    assert kill_suid(stat.S_IFREG | 0o6745) == stat.S_IFREG | 0o2745
    assert kill_suid(stat.S_IFDIR | 0o2755) == stat.S_IFDIR | 0o2755


def test_open_flags():
    f = parse_flags(os.O_RDONLY)
    assert (f.mask, f.write) == (R_OK, False)
    f = parse_flags(os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | 0o100000)
    assert (f.mask, f.write, f.excl) == (R_OK | W_OK, True, True)
    assert parse_flags(os.O_RDONLY | os.O_TRUNC).mask == R_OK | W_OK
    for bad in (3, -1, 1 << 31, "0"):
        with pytest.raises(OSError) as e:
            parse_flags(bad)
        assert e.value.errno == errno.EINVAL


@pytest.mark.slow
async def test_million_entry_directory_lists_in_bounded_memory():
    """1,000,000 entries (written straight into the KV) list page by page; the memory the
    listing allocates stays that of one page, not of the directory."""
    engine = open_engine("memory://")
    svc = make_service(engine)
    await svc.format()
    d = await svc.mkdir(ROOT, ROOT_INO, "huge")
    total, batch = 1_000_000, 5000
    for start in range(0, total, batch):
        def fill(txn, start=start):
            for i in range(start, start + batch):
                txn.set(s.dentry_key(d.ino, b"e%07d" % i), s.encode_dentry(10_000 + i, stat.S_IFREG))
        await engine.transact(fill)
        await asyncio.sleep(0)
    tracemalloc.start()
    count, last, peak_seen = 0, b"", 0
    async for e in svc.readdir_all(ROOT, d.ino, page=1000):
        assert e.name > last
        last = e.name
        count += 1
        if count % 100_000 == 0:
            peak_seen = max(peak_seen, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    assert count == total
    assert peak_seen < 20 << 20, f"listing peaked at {peak_seen >> 20} MiB"
    await engine.close()
