"""Permission checks as several users and groups, against every KV engine."""
import errno
import os
import stat

import pytest

from flyfs.metaserver import NOW, Caller
from meta_fixtures import ALICE, BOB, CAROL, ROOT, ROOT_INO, meta, touch  # noqa: F401

# ALICE (1000) and BOB (1001) share group 50; CAROL (1002) is in no shared group.


async def test_search_permission_on_every_component(meta):
    a = await meta.mkdir(ALICE, ROOT_INO, "a", 0o700)
    b = await meta.mkdir(ALICE, a.ino, "b", 0o777)
    f = await touch(meta, ALICE, b.ino, "f", 0o666)
    for op in (meta.lookup(BOB, a.ino, "b"), meta.resolve(BOB, "/a/b/f"),
               meta.create(BOB, a.ino, "x"), meta.resolve_parent(BOB, "/a/b/new")):
        with pytest.raises(PermissionError):
            await op
    # Without search on an ancestor, a direct lookup in the open directory still works
    # (the inode API checks the directory it is given, like openat on a held fd).
    assert (await meta.lookup(BOB, b.ino, "f")).ino == f.ino
    assert (await meta.resolve(ALICE, "/a/b/f")).ino == f.ino
    assert (await meta.resolve(ROOT, "/a/b/f")).ino == f.ino
    # Group search bit lets group members through.
    await meta.setattr(ALICE, a.ino, mode=0o710)
    await meta.setattr(ALICE, a.ino, gid=50)
    assert (await meta.resolve(BOB, "/a/b/f")).ino == f.ino
    with pytest.raises(PermissionError):
        await meta.resolve(CAROL, "/a/b/f")


async def test_directory_write_permission(meta):
    d = await meta.mkdir(ALICE, ROOT_INO, "d", 0o755)
    await touch(meta, ALICE, d.ino, "f")
    for op in (meta.create(BOB, d.ino, "x"), meta.mkdir(BOB, d.ino, "x"),
               meta.symlink(BOB, d.ino, "x", "t"), meta.unlink(BOB, d.ino, "f"),
               meta.rename(BOB, d.ino, "f", d.ino, "g"), meta.mknod(BOB, d.ino, "p", stat.S_IFIFO | 0o600)):
        with pytest.raises(PermissionError) as e:
            await op
        assert e.value.errno == errno.EACCES
    await meta.create(ROOT, d.ino, "by-root")
    listing, _ = await meta.readdir(BOB, d.ino)
    assert {e.name for e in listing} == {b"f", b"by-root"}
    hidden = await meta.mkdir(ALICE, ROOT_INO, "hidden", 0o711)
    with pytest.raises(PermissionError):
        await meta.readdir(BOB, hidden.ino)


async def test_open_modes_and_root_bypass(meta):
    f = await touch(meta, ALICE, ROOT_INO, "f", 0o640)
    await meta.setattr(ALICE, f.ino, gid=50)
    await meta.open(BOB, f.ino, os.O_RDONLY)          # group read
    with pytest.raises(PermissionError):
        await meta.open(BOB, f.ino, os.O_WRONLY)
    with pytest.raises(PermissionError):
        await meta.open(BOB, f.ino, os.O_RDONLY | os.O_TRUNC)  # O_TRUNC needs write
    with pytest.raises(PermissionError):
        await meta.open(CAROL, f.ino, os.O_RDONLY)
    _, session = await meta.open(ROOT, f.ino, os.O_RDWR)
    assert session
    await meta.access(BOB, f.ino, os.R_OK)
    with pytest.raises(PermissionError):
        await meta.access(BOB, f.ino, os.W_OK)
    with pytest.raises(PermissionError):
        await meta.access(ROOT, f.ino, os.X_OK)   # root may execute only if some x bit is set
    await meta.setattr(ALICE, f.ino, mode=0o650)
    await meta.access(ROOT, f.ino, os.X_OK)
    mine = await touch(meta, ALICE, ROOT_INO, "mine", 0o000)
    with pytest.raises(PermissionError):
        await meta.open(ALICE, mine.ino, os.O_RDONLY)   # owner bits apply to the owner
    await meta.open(ROOT, mine.ino, os.O_RDWR)
    # creat(path, 0) may still write the file it just created.
    n, s = await meta.create(BOB, ROOT_INO, "zero", 0o000, os.O_WRONLY)
    assert n.perm == 0 and s


async def test_sticky_directory(meta):
    tmp = await meta.mkdir(ALICE, ROOT_INO, "tmp", 0o1777)
    await touch(meta, BOB, tmp.ino, "bobs")
    await touch(meta, CAROL, tmp.ino, "carols")
    await meta.mkdir(BOB, tmp.ino, "bobdir")
    for op in (meta.unlink(CAROL, tmp.ino, "bobs"), meta.rename(CAROL, tmp.ino, "bobs", tmp.ino, "x"),
               meta.rmdir(CAROL, tmp.ino, "bobdir"), meta.rename(CAROL, tmp.ino, "carols", tmp.ino, "bobs")):
        with pytest.raises(PermissionError) as e:
            await op
        assert e.value.errno == errno.EPERM
    await meta.rename(BOB, tmp.ino, "bobs", tmp.ino, "bobs2")   # the entry's owner
    await meta.unlink(ALICE, tmp.ino, "carols")                # the directory's owner
    await meta.rmdir(ROOT, tmp.ino, "bobdir")                  # root
    await meta.unlink(BOB, tmp.ino, "bobs2")


async def test_setgid_directory_inheritance(meta):
    shared = await meta.mkdir(ALICE, ROOT_INO, "shared", 0o777)
    await meta.setattr(ALICE, shared.ino, gid=50, mode=0o2777)
    f, _ = await meta.create(CAROL, shared.ino, "f", 0o644)
    assert f.gid == 50 and not f.mode & stat.S_ISGID
    sub = await meta.mkdir(CAROL, shared.ino, "sub", 0o777)
    assert sub.gid == 50 and sub.mode & 0o7777 == 0o2777
    g = await meta.mknod(CAROL, sub.ino, "g", stat.S_IFREG | 0o2755)
    assert g.gid == 50 and not g.mode & stat.S_ISGID   # carol is not in group 50
    h = await meta.mknod(BOB, sub.ino, "h", stat.S_IFREG | 0o2755)
    assert h.mode & stat.S_ISGID                       # bob is
    plain = await meta.mkdir(CAROL, ROOT_INO, "plain")
    assert plain.gid == CAROL.gid and not plain.mode & stat.S_ISGID


async def test_chmod_and_chown_rules(meta):
    f = await touch(meta, ALICE, ROOT_INO, "f", 0o644)
    with pytest.raises(PermissionError) as e:
        await meta.setattr(BOB, f.ino, mode=0o777)
    assert e.value.errno == errno.EPERM
    with pytest.raises(PermissionError):
        await meta.setattr(ALICE, f.ino, uid=BOB.uid)
    with pytest.raises(PermissionError):
        await meta.setattr(ALICE, f.ino, gid=CAROL.gid)   # not her group
    with pytest.raises(PermissionError):
        await meta.setattr(BOB, f.ino, gid=50)            # not his file
    n = await meta.setattr(ALICE, f.ino, gid=50)
    assert n.gid == 50
    n = await meta.setattr(ALICE, f.ino, uid=ALICE.uid)   # chown to oneself is allowed
    assert n.uid == ALICE.uid
    # setgid dropped when the owner is not in the file's group.
    n = await meta.setattr(ROOT, f.ino, gid=CAROL.gid)
    n = await meta.setattr(ALICE, f.ino, mode=0o2755)
    assert not n.mode & stat.S_ISGID
    n = await meta.setattr(ROOT, f.ino, mode=0o6755)
    assert n.mode & 0o7777 == 0o6755
    # chown clears setuid, and setgid when group-exec is set, even done by root.
    n = await meta.setattr(ROOT, f.ino, uid=BOB.uid)
    assert n.uid == BOB.uid and n.mode & 0o7777 == 0o0755
    n = await meta.setattr(ROOT, f.ino, mode=0o2745)   # setgid without group-exec: mandatory locking, kept
    n = await meta.setattr(ROOT, f.ino, gid=0)
    assert n.mode & 0o7777 == 0o2745
    d = await meta.mkdir(ALICE, ROOT_INO, "d", 0o2755)
    assert not d.mode & stat.S_ISGID                   # mkdir ignores setgid in its mode, as Linux
    await meta.setattr(ALICE, d.ino, mode=0o2755)
    n = await meta.setattr(ROOT, d.ino, uid=BOB.uid)
    assert n.mode & stat.S_ISGID                       # directories keep setgid on chown


async def test_write_clears_setuid(meta):
    f = await touch(meta, ALICE, ROOT_INO, "f", 0o777)
    await meta.setattr(ALICE, f.ino, gid=50)
    assert (await meta.setattr(ALICE, f.ino, mode=0o6777)).mode & 0o7777 == 0o6777
    _, session = await meta.open(ROOT, f.ino, os.O_WRONLY)
    n = await meta.close(ROOT, f.ino, session, length=10, wrote=True)
    assert n.mode & 0o7777 == 0o6777                   # root's write keeps them
    _, session = await meta.open(BOB, f.ino, os.O_WRONLY)
    n = await meta.close(BOB, f.ino, session, length=20, wrote=True)
    assert n.mode & 0o7777 == 0o0777 and n.size == 20
    await meta.setattr(ROOT, f.ino, mode=0o4777)
    n = await meta.truncate(BOB, f.ino, 5)
    assert n.mode & 0o7777 == 0o0777 and n.size == 5


async def test_utimes_rules(meta):
    f = await touch(meta, ALICE, ROOT_INO, "f", 0o666)
    ro = await touch(meta, ALICE, ROOT_INO, "ro", 0o644)
    n = await meta.setattr(BOB, f.ino, atime=NOW, mtime=NOW)   # write permission suffices for "now"
    assert n.mtime >= f.mtime
    with pytest.raises(PermissionError) as e:
        await meta.setattr(BOB, f.ino, mtime=12345)
    assert e.value.errno == errno.EPERM
    with pytest.raises(PermissionError) as e:
        await meta.setattr(BOB, ro.ino, atime=NOW, mtime=NOW)
    assert e.value.errno == errno.EACCES
    await meta.setattr(ALICE, ro.ino, mtime=12345)
    await meta.setattr(ROOT, ro.ino, atime=777)
    got = await meta.getattr(BOB, ro.ino)
    assert (got.atime, got.mtime) == (777, 12345)


async def test_truncate_needs_write_unless_session(meta):
    f, session = await meta.create(ALICE, ROOT_INO, "f", 0o644, os.O_WRONLY)
    await meta.setattr(ALICE, f.ino, mode=0o444)
    with pytest.raises(PermissionError):
        await meta.truncate(BOB, f.ino, 0)
    with pytest.raises(PermissionError):
        await meta.truncate(ALICE, f.ino, 0)
    n = await meta.truncate(ALICE, f.ino, 7, session=session)   # ftruncate on a write descriptor
    assert n.size == 7
    with pytest.raises(PermissionError):
        await meta.truncate(BOB, f.ino, 0, session=b"x" * 16)     # a made-up session does not help


async def test_rename_directory_needs_write_on_it(meta):
    a = await meta.mkdir(BOB, ROOT_INO, "a", 0o777)
    b = await meta.mkdir(BOB, ROOT_INO, "b", 0o777)
    await meta.mkdir(ALICE, a.ino, "alices", 0o555)
    with pytest.raises(PermissionError):
        await meta.rename(BOB, a.ino, "alices", b.ino, "moved")   # its ".." would change
    await meta.rename(BOB, a.ino, "alices", a.ino, "renamed")     # same parent: fine
    await meta.rename(ROOT, a.ino, "renamed", b.ino, "moved")        # root bypasses it


async def test_xattr_permissions(meta):
    f = await touch(meta, ALICE, ROOT_INO, "f", 0o640)
    await meta.setattr(ALICE, f.ino, gid=50)
    await meta.setxattr(ALICE, f.ino, "user.k", b"v")
    assert await meta.getxattr(BOB, f.ino, "user.k") == b"v"
    with pytest.raises(PermissionError):
        await meta.setxattr(BOB, f.ino, "user.k", b"w")
    with pytest.raises(PermissionError):
        await meta.getxattr(CAROL, f.ino, "user.k")
    assert await meta.listxattr(CAROL, f.ino) == [b"user.k"]  # listing needs no permission
    tmp = await meta.mkdir(ALICE, ROOT_INO, "tmp", 0o1777)
    with pytest.raises(PermissionError) as e:
        await meta.setxattr(BOB, tmp.ino, "user.k", b"v")
    assert e.value.errno == errno.EPERM
    await meta.setxattr(ALICE, tmp.ino, "user.k", b"v")


async def test_empty_gids_and_uid_zero():
    nobody = Caller(4242, ())
    assert nobody.gid == 65534 and Caller(0, ()).gid == 0 and not nobody.is_root
