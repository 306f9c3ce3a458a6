"""Metadata semantics suite: every POSIX operation of MetaService, run against
every KV engine (memory, rocksdb, etcd) through the `engine` fixture."""
import errno
import os
import stat

import pytest

from flyfs.metaserver import NOW, RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE
from flyfs.metaserver.schema import NS
from meta_fixtures import (ALICE, BOB, CHAINS, ROOT, ROOT_INO, dump, make_service, meta,  # noqa: F401
                           names, touch)


def err(excinfo) -> int:
    return excinfo.value.errno


async def test_format_is_idempotent(engine):
    svc = make_service(engine)
    assert await svc.format(root_mode=0o755) is True
    before = await dump(engine)
    assert await svc.format(root_mode=0o700) is False
    assert await dump(engine) == before
    root = await svc.getattr(ROOT, ROOT_INO)
    assert root.is_dir and root.perm == 0o755 and root.nlink == 2 and root.uid == 0
    # A second server on the same namespace sees the same root and allocates distinct ids.
    other = make_service(engine)
    assert await other.format() is False
    a = await svc.mkdir(ROOT, ROOT_INO, "a")
    b = await other.mkdir(ROOT, ROOT_INO, "b")
    assert a.ino != b.ino and {a.ino, b.ino}.isdisjoint({ROOT_INO})


async def test_mkdir_lookup_getattr(meta):
    d = await meta.mkdir(ALICE, ROOT_INO, "dir", 0o750)
    assert d.is_dir and d.perm == 0o750 and d.uid == ALICE.uid and d.gid == ALICE.gid
    assert d.nlink == 2 and d.parent == ROOT_INO
    assert (await meta.getattr(ALICE, ROOT_INO)).nlink == 3
    assert await meta.lookup(ALICE, ROOT_INO, "dir") == await meta.getattr(ALICE, d.ino)
    assert (await meta.lookup(ALICE, d.ino, ".")).ino == d.ino
    assert (await meta.lookup(ALICE, d.ino, "..")).ino == ROOT_INO
    assert (await meta.lookup(ALICE, ROOT_INO, "..")).ino == ROOT_INO
    with pytest.raises(FileNotFoundError):
        await meta.lookup(ALICE, ROOT_INO, "nope")
    with pytest.raises(FileExistsError):
        await meta.mkdir(ALICE, ROOT_INO, "dir")
    sub = await meta.mkdir(ALICE, d.ino, "sub", 0o777, umask=0o022)
    assert sub.perm == 0o755
    assert (await meta.getattr(ALICE, d.ino)).nlink == 3
    with pytest.raises(FileNotFoundError):
        await meta.getattr(ALICE, 987654321)


async def test_create_exclusive_and_open_existing(meta):
    f, session = await meta.create(ALICE, ROOT_INO, "f", 0o640, os.O_WRONLY | os.O_EXCL)
    assert f.is_reg and f.perm == 0o640 and f.size == 0 and f.nlink == 1 and session
    assert [x.session for x in await meta.list_sessions(f.ino)] == [session]
    with pytest.raises(FileExistsError):
        await meta.create(ALICE, ROOT_INO, "f", 0o600, os.O_WRONLY | os.O_EXCL)
    again, s2 = await meta.create(ALICE, ROOT_INO, "f", 0o600, os.O_RDONLY)
    assert again.ino == f.ino and again.perm == 0o640 and s2 is None
    d = await meta.mkdir(ALICE, ROOT_INO, "d")
    with pytest.raises(IsADirectoryError):
        await meta.create(ALICE, ROOT_INO, "d", 0o600, os.O_RDWR)
    with pytest.raises(NotADirectoryError):
        await meta.create(ALICE, f.ino, "x", 0o600, os.O_RDWR)
    g, _ = await meta.create(ALICE, d.ino, "g", 0o666, os.O_RDWR, umask=0o027)
    assert g.perm == 0o640
    assert g.layout.chunk_size == d.layout.chunk_size
    assert set(g.layout.chains) <= set(CHAINS) and g.layout.chain_table_version == 7


async def test_mknod_kinds(meta):
    fifo = await meta.mknod(ALICE, ROOT_INO, "fifo", stat.S_IFIFO | 0o644)
    sock = await meta.mknod(ALICE, ROOT_INO, "sock", stat.S_IFSOCK | 0o600)
    chr_ = await meta.mknod(ROOT, ROOT_INO, "null", stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3))
    blk = await meta.mknod(ROOT, ROOT_INO, "sda", stat.S_IFBLK | 0o660, rdev=os.makedev(8, 0))
    reg = await meta.mknod(ALICE, ROOT_INO, "reg", 0o644)
    assert stat.S_ISFIFO(fifo.mode) and stat.S_ISSOCK(sock.mode)
    assert stat.S_ISCHR(chr_.mode) and chr_.rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(blk.mode) and os.major(blk.rdev) == 8
    assert reg.is_reg and reg.layout.chains
    entries = {e.name: e.type for e in (await meta.readdir(ALICE, ROOT_INO))[0]}
    assert entries[b"fifo"] == stat.S_IFIFO and entries[b"null"] == stat.S_IFCHR
    with pytest.raises(PermissionError):
        await meta.mknod(ALICE, ROOT_INO, "dev", stat.S_IFCHR | 0o666, rdev=1)
    with pytest.raises(OSError) as e:
        await meta.mknod(ALICE, ROOT_INO, "dir", stat.S_IFDIR | 0o755)
    assert err(e) == errno.EPERM
    with pytest.raises(OSError) as e:
        await meta.mknod(ALICE, ROOT_INO, "lnk", stat.S_IFLNK | 0o777)
    assert err(e) == errno.EINVAL
    # FIFO opened for writing records no session (no chunks behind it).
    _, session = await meta.open(ALICE, fifo.ino, os.O_WRONLY)
    assert session is None


async def test_symlink_readlink(meta):
    ln = await meta.symlink(ALICE, ROOT_INO, "ln", "some/where")
    assert ln.is_symlink and ln.size == len("some/where") and ln.perm == 0o777
    assert await meta.readlink(ALICE, ln.ino) == b"some/where"
    f, _ = await meta.create(ALICE, ROOT_INO, "f")
    with pytest.raises(OSError) as e:
        await meta.readlink(ALICE, f.ino)
    assert err(e) == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        await meta.symlink(ALICE, ROOT_INO, "empty", "")
    with pytest.raises(OSError) as e:
        await meta.symlink(ALICE, ROOT_INO, "long", "x" * 4096)
    assert err(e) == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        await meta.open(ALICE, ln.ino, os.O_RDONLY)
    assert err(e) == errno.ELOOP


async def test_hard_links(engine):
    svc = make_service(engine, link_max=3)
    await svc.format(root_mode=0o1777)
    f, session = await svc.create(ALICE, ROOT_INO, "f")
    d = await svc.mkdir(ALICE, ROOT_INO, "d")
    g = await svc.link(ALICE, f.ino, d.ino, "g")
    assert g.ino == f.ino and g.nlink == 2 and g.ctime >= f.ctime
    await svc.link(ALICE, f.ino, ROOT_INO, "h")
    assert (await svc.getattr(ALICE, f.ino)).nlink == 3
    with pytest.raises(OSError) as e:
        await svc.link(ALICE, f.ino, ROOT_INO, "i")
    assert err(e) == errno.EMLINK
    with pytest.raises(FileExistsError):
        await svc.link(ALICE, f.ino, d.ino, "g")
    with pytest.raises(PermissionError) as e:
        await svc.link(ALICE, d.ino, ROOT_INO, "dlink")
    assert err(e) == errno.EPERM
    await svc.unlink(ALICE, ROOT_INO, "f")
    await svc.unlink(ALICE, ROOT_INO, "h")
    left = await svc.lookup(ALICE, d.ino, "g")
    assert left.nlink == 1 and await svc.gc_queue() == []
    await svc.unlink(ALICE, d.ino, "g")
    assert await svc.gc_queue() == []          # still open for writing: kept
    orphan = await svc.getattr(ALICE, f.ino)
    assert orphan.nlink == 0
    await svc.close(ALICE, f.ino, session)
    assert await svc.gc_queue() == [f.ino]
    with pytest.raises(FileNotFoundError):
        await svc.link(ALICE, f.ino, ROOT_INO, "revive")


async def test_unlink_rmdir_errors(meta):
    d = await meta.mkdir(ALICE, ROOT_INO, "d")
    await meta.create(ALICE, d.ino, "f")
    with pytest.raises(IsADirectoryError):
        await meta.unlink(ALICE, ROOT_INO, "d")
    with pytest.raises(NotADirectoryError):
        await meta.rmdir(ALICE, d.ino, "f")
    with pytest.raises(OSError) as e:
        await meta.rmdir(ALICE, ROOT_INO, "d")
    assert err(e) == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        await meta.rmdir(ALICE, d.ino, ".")
    assert err(e) == errno.EINVAL
    with pytest.raises(OSError) as e:
        await meta.rmdir(ALICE, d.ino, "..")
    assert err(e) == errno.ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        await meta.unlink(ALICE, d.ino, "missing")
    await meta.unlink(ALICE, d.ino, "f")
    nlink = (await meta.getattr(ALICE, ROOT_INO)).nlink
    await meta.rmdir(ALICE, ROOT_INO, "d")
    assert (await meta.getattr(ALICE, ROOT_INO)).nlink == nlink - 1
    with pytest.raises(FileNotFoundError):
        await meta.getattr(ALICE, d.ino)
    with pytest.raises(FileNotFoundError):
        await meta.create(ALICE, d.ino, "late")


async def test_rename_basic_and_replace(meta):
    a = await meta.mkdir(ALICE, ROOT_INO, "a")
    b = await meta.mkdir(ALICE, ROOT_INO, "b")
    f = await touch(meta, ALICE, a.ino, "f")
    await meta.rename(ALICE, a.ino, "f", a.ino, "f2")
    assert await names(meta, ALICE, a.ino) == [b"f2"]
    await meta.rename(ALICE, a.ino, "f2", b.ino, "f3")
    assert await names(meta, ALICE, a.ino) == [] and (await meta.lookup(ALICE, b.ino, "f3")).ino == f.ino
    # Replace a file: the old target loses its link and goes to GC.
    g = await touch(meta, ALICE, b.ino, "g")
    await meta.rename(ALICE, b.ino, "f3", b.ino, "g")
    assert (await meta.lookup(ALICE, b.ino, "g")).ino == f.ino
    assert await meta.gc_queue() == [g.ino]
    # Rename onto a hard link of the same inode: nothing happens.
    await meta.link(ALICE, f.ino, b.ino, "same")
    await meta.rename(ALICE, b.ino, "g", b.ino, "same")
    assert sorted(await names(meta, ALICE, b.ino)) == [b"g", b"same"]
    # Renaming to itself is a no-op too.
    await meta.rename(ALICE, b.ino, "g", b.ino, "g")
    assert (await meta.getattr(ALICE, f.ino)).nlink == 2
    with pytest.raises(FileNotFoundError):
        await meta.rename(ALICE, a.ino, "missing", b.ino, "x")


async def test_rename_directories(meta):
    a = await meta.mkdir(ALICE, ROOT_INO, "a")
    b = await meta.mkdir(ALICE, ROOT_INO, "b")
    d = await meta.mkdir(ALICE, a.ino, "d")
    sub = await meta.mkdir(ALICE, d.ino, "sub")
    await meta.rename(ALICE, a.ino, "d", b.ino, "d")
    assert (await meta.getattr(ALICE, a.ino)).nlink == 2
    assert (await meta.getattr(ALICE, b.ino)).nlink == 3
    moved = await meta.getattr(ALICE, d.ino)
    assert moved.parent == b.ino and (await meta.lookup(ALICE, d.ino, "..")).ino == b.ino
    # Into itself or a descendant.
    for target in (d.ino, sub.ino):
        with pytest.raises(OSError) as e:
            await meta.rename(ALICE, b.ino, "d", target, "x")
        assert err(e) == errno.EINVAL
    # Replace an empty directory; refuse a non-empty one; type mismatches.
    empty = await meta.mkdir(ALICE, a.ino, "empty")
    await meta.rename(ALICE, b.ino, "d", a.ino, "empty")
    with pytest.raises(FileNotFoundError):
        await meta.getattr(ALICE, empty.ino)
    assert (await meta.getattr(ALICE, a.ino)).nlink == 3 and (await meta.getattr(ALICE, b.ino)).nlink == 2
    full = await meta.mkdir(ALICE, b.ino, "full")
    await meta.create(ALICE, full.ino, "x")
    with pytest.raises(OSError) as e:
        await meta.rename(ALICE, a.ino, "empty", b.ino, "full")
    assert err(e) == errno.ENOTEMPTY
    f, _ = await meta.create(ALICE, b.ino, "file")
    with pytest.raises(NotADirectoryError):
        await meta.rename(ALICE, a.ino, "empty", b.ino, "file")
    with pytest.raises(IsADirectoryError):
        await meta.rename(ALICE, b.ino, "file", a.ino, "empty")
    # A directory cannot replace its own ancestor either (the ancestor is not empty).
    with pytest.raises(OSError) as e:
        await meta.rename(ALICE, d.ino, "sub", ROOT_INO, "a")
    assert err(e) == errno.ENOTEMPTY


async def test_rename_noreplace_and_exchange(meta):
    a = await meta.mkdir(ALICE, ROOT_INO, "a")
    b = await meta.mkdir(ALICE, ROOT_INO, "b")
    f, _ = await meta.create(ALICE, a.ino, "f")
    g, _ = await meta.create(ALICE, b.ino, "g")
    with pytest.raises(FileExistsError):
        await meta.rename(ALICE, a.ino, "f", b.ino, "g", RENAME_NOREPLACE)
    await meta.rename(ALICE, a.ino, "f", b.ino, "new", RENAME_NOREPLACE)
    await meta.rename(ALICE, b.ino, "new", a.ino, "f")
    await meta.rename(ALICE, a.ino, "f", b.ino, "g", RENAME_EXCHANGE)
    assert (await meta.lookup(ALICE, a.ino, "f")).ino == g.ino
    assert (await meta.lookup(ALICE, b.ino, "g")).ino == f.ino
    # Exchange a directory with a file across parents: parent pointers and link counts follow.
    d = await meta.mkdir(ALICE, a.ino, "d")
    await meta.rename(ALICE, a.ino, "d", b.ino, "g", RENAME_EXCHANGE)
    assert (await meta.getattr(ALICE, d.ino)).parent == b.ino
    assert (await meta.getattr(ALICE, a.ino)).nlink == 2 and (await meta.getattr(ALICE, b.ino)).nlink == 3
    assert (await meta.lookup(ALICE, a.ino, "d")).ino == f.ino
    with pytest.raises(FileNotFoundError):
        await meta.rename(ALICE, a.ino, "d", b.ino, "absent", RENAME_EXCHANGE)
    # Exchanging a directory with its own ancestor would make a loop.
    inner = await meta.mkdir(ALICE, d.ino, "inner")
    with pytest.raises(OSError) as e:
        await meta.rename(ALICE, d.ino, "inner", ROOT_INO, "b", RENAME_EXCHANGE)
    assert err(e) == errno.EINVAL
    assert (await meta.getattr(ALICE, inner.ino)).parent == d.ino
    for flags in (RENAME_EXCHANGE | RENAME_NOREPLACE, 8, 4):
        with pytest.raises(OSError) as e:
            await meta.rename(ALICE, a.ino, "d", b.ino, "g", flags)
        assert err(e) == errno.EINVAL


async def test_readdir_pages(meta):
    d = await meta.mkdir(ALICE, ROOT_INO, "big")
    want = sorted(f"n{i:04d}".encode() for i in range(150))
    for n in want:
        await meta.mknod(ALICE, d.ino, n, stat.S_IFIFO | 0o644)
    sub = await meta.mkdir(ALICE, d.ino, "zdir")
    pages, cursor, got = 0, b"", []
    while True:
        entries, cursor = await meta.readdir(ALICE, d.ino, cursor, limit=40)
        assert len(entries) <= 40
        got += entries
        pages += 1
        if cursor is None:
            break
    assert pages == 4 and [e.name for e in got] == want + [b"zdir"]
    assert got[-1].ino == sub.ino and got[-1].type == stat.S_IFDIR
    plus, _ = await meta.readdir(ALICE, d.ino, want[-1], plus=True)
    assert [e.name for e in plus] == [b"zdir"] and plus[0].attr.nlink == 2
    plus, cursor = await meta.readdir(ALICE, d.ino, plus=True, limit=200)   # more keys than one etcd Txn
    assert cursor is None and len(plus) == 151
    assert all(e.attr.ino == e.ino and e.attr.type == e.type for e in plus)
    assert len([e async for e in meta.readdir_all(ALICE, d.ino, page=7)]) == 151
    f, _ = await meta.create(ALICE, ROOT_INO, "plain")
    with pytest.raises(NotADirectoryError):
        await meta.readdir(ALICE, f.ino)


async def test_setattr_times_and_ctime(meta):
    f, _ = await meta.create(ALICE, ROOT_INO, "f", 0o644)
    huge = (1 << 62) * NS + 123456789   # seconds far past 2**32 keep their nanoseconds
    neg = -(1 << 40) * NS + 1
    n = await meta.setattr(ALICE, f.ino, atime=huge, mtime=neg)
    assert (n.atime, n.mtime) == (huge, neg)
    again = await meta.getattr(ALICE, f.ino)
    assert (again.atime, again.mtime) == (huge, neg) and again.ctime >= f.ctime
    n = await meta.setattr(ALICE, f.ino, mtime=NOW)
    assert abs(n.mtime - n.ctime) < 5 * NS and n.atime == huge
    n2 = await meta.setattr(ALICE, f.ino, mode=0o600)
    assert n2.perm == 0o600 and n2.ctime >= n.ctime and n2.mtime == n.mtime
    n3 = await meta.setattr(ALICE, f.ino, mode=stat.S_IFREG | 0o640)
    assert n3.mode == stat.S_IFREG | 0o640
    with pytest.raises(OSError) as e:
        await meta.setattr(ALICE, f.ino, mode=stat.S_IFDIR | 0o755)
    assert err(e) == errno.EINVAL
    with pytest.raises(OSError) as e:
        await meta.setattr(ALICE, f.ino, atime=(1 << 63) * NS)
    assert err(e) == errno.EINVAL
    same = await meta.setattr(ALICE, f.ino)
    assert same == await meta.getattr(ALICE, f.ino)


async def test_directory_times_follow_entries(meta):
    d = await meta.mkdir(ALICE, ROOT_INO, "d")
    old = 1_000_000 * NS
    await meta.setattr(ALICE, d.ino, mtime=old)
    assert (await meta.getattr(ALICE, d.ino)).mtime == old
    await meta.create(ALICE, d.ino, "f")
    after_create = await meta.getattr(ALICE, d.ino)
    assert after_create.mtime > old and after_create.ctime >= after_create.mtime
    await meta.setattr(ALICE, d.ino, mtime=old)
    got = await meta.getattr(ALICE, d.ino)
    assert got.mtime == old
    assert (await meta.lookup(ALICE, ROOT_INO, "d")).mtime == old
    await meta.setattr(ALICE, d.ino, mode=0o700)  # chmod keeps mtime
    assert (await meta.getattr(ALICE, d.ino)).mtime == old
    await meta.unlink(ALICE, d.ino, "f")
    assert (await meta.getattr(ALICE, d.ino)).mtime > old


async def test_changes_return_their_directories_as_stored(meta):
    """create/mkdir/mknod/symlink (with_dir), unlink, rmdir and rename return the
    directories' attributes right after the change: exactly what a getattr then reads."""
    d = await meta.mkdir(ALICE, ROOT_INO, "d")
    e = await meta.mkdir(ALICE, ROOT_INO, "e")

    async def same(got, ino):
        assert got == await meta.getattr(ALICE, ino)

    f, _, after = await meta.create(ALICE, d.ino, "f", 0o644, os.O_WRONLY, with_dir=True)
    await same(after, d.ino)
    assert after.mtime == after.ctime == f.ctime
    assert (await meta.create(ALICE, d.ino, "f", 0o644, os.O_WRONLY, with_dir=True))[2] is None   # existed
    sub, after = await meta.mkdir(ALICE, d.ino, "sub", with_dir=True)
    await same(after, d.ino)
    assert after.nlink == 3 and sub.is_dir
    await same((await meta.mknod(ALICE, d.ino, "p", stat.S_IFIFO | 0o600, with_dir=True))[1], d.ino)
    await same((await meta.symlink(ALICE, d.ino, "s", "f", with_dir=True))[1], d.ino)
    await same(await meta.unlink(ALICE, d.ino, "p"), d.ino)
    await same(await meta.rmdir(ALICE, d.ino, "sub"), d.ino)
    src, dst = await meta.rename(ALICE, d.ino, "s", d.ino, "s2")
    assert dst is None
    await same(src, d.ino)
    src, dst = await meta.rename(ALICE, d.ino, "f", e.ino, "f")
    await same(src, d.ino)
    await same(dst, e.ino)
    assert await meta.rename(ALICE, e.ino, "f", e.ino, "f") == (None, None)    # nothing changes


async def test_truncate_through_storage(meta):
    storage = meta.ctx.storage
    f, session = await meta.create(ALICE, ROOT_INO, "f", 0o644)
    cs = f.layout.chunk_size
    data = bytes(range(256)) * (cs * 3 // 256 + 1)
    storage.write(f.ino, f.layout, 0, data[:cs * 3 - 100])
    await meta.close(ALICE, f.ino, session, length=cs * 3 - 100, wrote=True)
    assert storage.chunk_count(f.ino) == 3
    n = await meta.truncate(ALICE, f.ino, cs + 10)
    assert n.size == cs + 10 and storage.chunk_count(f.ino) == 2
    assert storage.read(f.ino, f.layout, 0, cs + 20) == data[:cs + 10] + b"\0" * 10
    n = await meta.truncate(ALICE, f.ino, 5 * cs)
    assert n.size == 5 * cs and storage.read(f.ino, f.layout, cs, 20) == data[cs:cs + 10] + b"\0" * 10
    await meta.setattr(ALICE, f.ino, size=0)
    assert storage.chunk_count(f.ino) == 0 and (await meta.getattr(ALICE, f.ino)).size == 0
    d = await meta.mkdir(ALICE, ROOT_INO, "d")
    with pytest.raises(IsADirectoryError):
        await meta.truncate(ALICE, d.ino, 0)
    with pytest.raises(OSError) as e:
        await meta.truncate(ALICE, f.ino, -1)
    assert err(e) == errno.EINVAL
    # O_TRUNC on open empties the file through storage too.
    storage.write(f.ino, f.layout, 0, b"hello")
    await meta.close(ALICE, f.ino, None, length=5)
    n, s2 = await meta.open(ALICE, f.ino, os.O_WRONLY | os.O_TRUNC)
    assert n.size == 0 and storage.chunk_count(f.ino) == 0 and s2


async def test_xattrs(meta):
    f = await touch(meta, ALICE, ROOT_INO, "f", 0o644)
    await meta.setxattr(ALICE, f.ino, "user.a", b"1")
    await meta.setxattr(ALICE, f.ino, b"user.b", b"\x00\xff" * 100)
    assert await meta.getxattr(ALICE, f.ino, "user.b") == b"\x00\xff" * 100
    assert sorted(await meta.listxattr(ALICE, f.ino)) == [b"user.a", b"user.b"]
    with pytest.raises(FileExistsError):
        await meta.setxattr(ALICE, f.ino, "user.a", b"2", XATTR_CREATE)
    with pytest.raises(OSError) as e:
        await meta.setxattr(ALICE, f.ino, "user.c", b"2", XATTR_REPLACE)
    assert err(e) == errno.ENODATA
    await meta.setxattr(ALICE, f.ino, "user.a", b"2", XATTR_REPLACE)
    assert await meta.getxattr(ALICE, f.ino, "user.a") == b"2"
    await meta.removexattr(ALICE, f.ino, "user.a")
    for op in (meta.getxattr(ALICE, f.ino, "user.a"), meta.removexattr(ALICE, f.ino, "user.a")):
        with pytest.raises(OSError) as e:
            await op
        assert err(e) == errno.ENODATA
    for name in ("security.selinux", "system.posix_acl_access", "other.x"):
        with pytest.raises(OSError) as e:
            await meta.setxattr(ALICE, f.ino, name, b"v")
        assert err(e) == errno.EOPNOTSUPP
    with pytest.raises(PermissionError):
        await meta.setxattr(ALICE, f.ino, "trusted.x", b"v")
    await meta.setxattr(ROOT, f.ino, "trusted.x", b"v")
    with pytest.raises(OSError) as e:
        await meta.getxattr(ALICE, f.ino, "trusted.x")
    assert err(e) == errno.ENODATA
    assert await meta.listxattr(ALICE, f.ino) == [b"user.b"]
    assert sorted(await meta.listxattr(ROOT, f.ino)) == [b"trusted.x", b"user.b"]
    with pytest.raises(OSError) as e:
        await meta.setxattr(ALICE, f.ino, "user.big", b"x" * 65537)
    assert err(e) == errno.E2BIG
    with pytest.raises(OSError) as e:
        await meta.setxattr(ALICE, f.ino, "user." + "n" * 251, b"")
    assert err(e) == errno.ERANGE
    ln = await meta.symlink(ALICE, ROOT_INO, "ln", "f")
    with pytest.raises(PermissionError):
        await meta.setxattr(ALICE, ln.ino, "user.a", b"1")
    # Removing the file removes its attributes with it (nothing left under MX).
    await meta.unlink(ALICE, ROOT_INO, "f")
    await meta.run_gc_once()
    assert not [k for k in await dump(meta.engine) if k.startswith(b"MX")]


async def test_statfs(meta):
    st = await meta.statfs(ALICE)
    assert st.bsize == 4096 and st.blocks == (1 << 40) // 4096 and st.bfree == (1 << 39) // 4096
    assert st.namemax == 255 and st.files >= 1


async def test_resolve_paths_and_symlinks(meta):
    a = await meta.mkdir(ALICE, ROOT_INO, "a")
    b = await meta.mkdir(ALICE, a.ino, "b")
    f, _ = await meta.create(ALICE, b.ino, "f")
    await meta.symlink(ALICE, ROOT_INO, "abs", "/a/b")
    await meta.symlink(ALICE, a.ino, "rel", "b/f")
    await meta.symlink(ALICE, ROOT_INO, "loop1", "loop2")
    await meta.symlink(ALICE, ROOT_INO, "loop2", "loop1")
    assert (await meta.resolve(ALICE, "/a/b/f")).ino == f.ino
    assert (await meta.resolve(ALICE, "a/./b/../b/f")).ino == f.ino
    assert (await meta.resolve(ALICE, "/abs/f")).ino == f.ino
    assert (await meta.resolve(ALICE, "/a/rel")).ino == f.ino
    assert (await meta.resolve(ALICE, "/a/rel", follow=False)).is_symlink
    assert (await meta.resolve(ALICE, "/abs/")).ino == b.ino
    assert (await meta.resolve(ALICE, "/..")).ino == ROOT_INO
    assert (await meta.resolve(ALICE, "f", base=b.ino)).ino == f.ino
    d, name = await meta.resolve_parent(ALICE, "/abs/newfile")
    assert d.ino == b.ino and name == b"newfile"
    with pytest.raises(OSError) as e:
        await meta.resolve(ALICE, "/loop1/x")
    assert err(e) == errno.ELOOP
    with pytest.raises(NotADirectoryError):
        await meta.resolve(ALICE, "/a/b/f/")
    with pytest.raises(NotADirectoryError):
        await meta.resolve(ALICE, "/a/b/f/x")
    with pytest.raises(FileNotFoundError):
        await meta.resolve(ALICE, "/a/missing/x")
    with pytest.raises(FileNotFoundError):
        await meta.resolve(ALICE, "")
    with pytest.raises(OSError) as e:
        await meta.resolve(ALICE, "/" + "a/" * 2048)
    assert err(e) == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        await meta.resolve(ALICE, "/" + "x" * 256)
    assert err(e) == errno.ENAMETOOLONG


async def test_symlink_limit_is_40(meta):
    f = await touch(meta, ALICE, ROOT_INO, "f")
    prev = "f"
    for i in range(41):
        await meta.symlink(ALICE, ROOT_INO, f"l{i}", prev)
        prev = f"l{i}"
    assert (await meta.resolve(ALICE, "/l39")).ino == f.ino   # 40 links followed
    with pytest.raises(OSError) as e:
        await meta.resolve(ALICE, "/l40")                       # 41
    assert err(e) == errno.ELOOP
    assert (await meta.resolve(ALICE, "/l40", follow=False)).is_symlink


async def test_sessions_and_length(meta):
    f, session = await meta.create(ALICE, ROOT_INO, "f")
    n = await meta.sync(ALICE, f.ino, session, length=100, wrote=True)
    assert n.size == 100
    n = await meta.close(ALICE, f.ino, session, length=50)
    assert n.size == 100  # a shorter report never shrinks the file; truncate does
    assert await meta.list_sessions(f.ino) == []
    ro, none = await meta.open(ALICE, f.ino, os.O_RDONLY)
    assert none is None and ro.size == 100
    with pytest.raises(OSError) as e:
        await meta.open(ALICE, f.ino, os.O_WRONLY | os.O_RDWR)
    assert err(e) == errno.EINVAL
    d = await meta.mkdir(ALICE, ROOT_INO, "d")
    with pytest.raises(IsADirectoryError):
        await meta.open(ALICE, d.ino, os.O_WRONLY)
    with pytest.raises(NotADirectoryError):
        await meta.open(ALICE, f.ino, os.O_RDONLY | os.O_DIRECTORY)
    await meta.open(ALICE, d.ino, os.O_RDONLY | os.O_DIRECTORY)


async def test_layout_inheritance(meta):
    d = await meta.mkdir(ALICE, ROOT_INO, "d")
    n = await meta.set_layout(ALICE, d.ino, 1 << 16, 2)
    assert (n.layout.chunk_size, n.layout.stripe) == (1 << 16, 2)
    sub = await meta.mkdir(ALICE, d.ino, "sub")
    assert (sub.layout.chunk_size, sub.layout.stripe) == (1 << 16, 2)
    files = [(await meta.create(ALICE, sub.ino, f"f{i}"))[0] for i in range(12)]
    for f in files:
        lay = f.layout
        assert lay.chunk_size == 1 << 16 and lay.stripe == 2 and len(lay.chains) == 2
        assert lay.chain_table_version == 7 and set(lay.chains) <= set(CHAINS)
        assert [lay.chain_of(i) for i in range(4)] == [lay.chains[(lay.seed + i) % 2] for i in range(4)]
    assert len({f.layout.chains for f in files}) > 1  # files spread over the table
    wide = await meta.set_layout(ALICE, d.ino, 1 << 20, 64)
    g, _ = await meta.create(ALICE, wide.ino, "g")
    assert g.layout.stripe == len(CHAINS)  # never wider than the chain table
    with pytest.raises(PermissionError):
        await meta.set_layout(BOB, d.ino, 1 << 20, 1)
    with pytest.raises(NotADirectoryError):
        await meta.set_layout(ALICE, g.ino, 1 << 20, 1)
    for cs, st in ((3000, 1), (1 << 20, 0), (1 << 31, 1)):
        with pytest.raises(OSError) as e:
            await meta.set_layout(ALICE, d.ino, cs, st)
        assert err(e) == errno.EINVAL


async def test_idempotent_remove_and_rename(meta):
    d = await meta.mkdir(ALICE, ROOT_INO, "d")
    await meta.create(ALICE, d.ino, "f")
    await meta.create(ALICE, d.ino, "g")
    await meta.mkdir(ALICE, d.ino, "sub")
    u1 = ALICE.with_uuid(b"u" * 16)
    await meta.unlink(u1, d.ino, "f")
    await meta.unlink(u1, d.ino, "f")      # the retry answers like the first call
    with pytest.raises(FileNotFoundError):
        await meta.unlink(ALICE.with_uuid(b"v" * 16), d.ino, "f")
    u2 = ALICE.with_uuid(b"r" * 16)
    await meta.rename(u2, d.ino, "g", d.ino, "h")
    await meta.rename(u2, d.ino, "g", d.ino, "h")
    assert sorted(await names(meta, ALICE, d.ino)) == [b"h", b"sub"]
    u3 = ALICE.with_uuid(b"d" * 16)
    await meta.rmdir(u3, d.ino, "sub")
    await meta.rmdir(u3, d.ino, "sub")
    with pytest.raises(OSError) as e:
        await meta.unlink(u3, d.ino, "h")   # a uuid belongs to one operation
    assert err(e) == errno.EINVAL
    assert (await meta.lookup(ALICE, d.ino, "h")).is_reg


async def test_idempotency_records_expire(engine):
    now = [10**18]
    svc = make_service(engine, idempotency_ttl=60)
    svc.ctx.clock = lambda: now[0]
    await svc.format(root_mode=0o1777)
    for i in range(3):
        await touch(svc, ALICE, ROOT_INO, f"f{i}")
        await svc.unlink(ALICE.with_uuid(b"%016d" % i), ROOT_INO, f"f{i}")
    keys = await dump(engine)
    assert sum(k.startswith(b"MR") for k in keys) == 3 and sum(k.startswith(b"ME") for k in keys) == 3
    first = await svc.run_gc_once()
    assert first.records == 0 and first.inodes == 3
    now[0] += 61 * NS
    assert (await svc.run_gc_once()).records == 3
    assert not [k for k in await dump(engine) if k[:2] in (b"MR", b"ME")]


async def test_commits_answered_from_the_os_and_fsync_reports_synced(tmp_path):
    """On RocksDB a metadata commit is answered once the OS has it (synced within
    sync_interval); an fsync's length report (sync durable=True) is on disk before its
    answer; sync_commits=True syncs every commit."""
    from flyfs.kv import open_engine
    from flyfs.metaserver import MetaConfig, MetaService, static_chain_table
    kv = open_engine(f"rocksdb://{tmp_path}/relaxed")
    try:
        svc = MetaService(kv, chain_table=static_chain_table(CHAINS), config=MetaConfig(sync_interval=60))
        await svc.format(root_mode=0o777)
        await svc.create(ALICE, ROOT_INO, "f0", os.O_WRONLY)    # (also reserves inode ids)
        before = kv.wal_syncs
        f, session = await svc.create(ALICE, ROOT_INO, "f", os.O_WRONLY)
        await svc.sync(ALICE, f.ino, session, 10, True)                # a periodic report
        assert kv.wal_syncs == before
        n = await svc.sync(ALICE, f.ino, session, 20, True, durable=True)  # fsync's report
        assert n.size == 20 and kv.wal_syncs == before + 1
    finally:
        await kv.close()
    kv = open_engine(f"rocksdb://{tmp_path}/synced")
    try:
        svc = MetaService(kv, chain_table=static_chain_table(CHAINS), config=MetaConfig(sync_commits=True))
        await svc.format(root_mode=0o777)
        await svc.create(ALICE, ROOT_INO, "g0", os.O_WRONLY)    # (also reserves inode ids)
        before = kv.wal_syncs
        await svc.create(ALICE, ROOT_INO, "g", os.O_WRONLY)
        assert kv.wal_syncs == before + 1 and kv.sync_commits
    finally:
        await kv.close()
