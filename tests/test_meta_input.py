"""Bad input: malformed names, invalid modes/flags/ids, unknown inodes — a clear
errno and message, and nothing written to the KV."""
import errno
import os
import stat

import pytest

from flyfs.metaserver import NOW, Caller
from meta_fixtures import ALICE, ROOT, ROOT_INO, dump, meta, touch  # noqa: F401

LONG = "n" * 256
MISSING = 424242


def bad_calls(m, d: int, f: int):
    """(expected errno, coroutine factory) for calls that must fail without writing."""
    A = ALICE
    return [
        # names
        (errno.EINVAL, lambda: m.mkdir(A, d, "")),
        (errno.EINVAL, lambda: m.mkdir(A, d, "a/b")),
        (errno.EINVAL, lambda: m.mkdir(A, d, "a\0b")),
        (errno.EEXIST, lambda: m.mkdir(A, d, ".")),
        (errno.EEXIST, lambda: m.mkdir(A, d, "..")),
        (errno.ENAMETOOLONG, lambda: m.mkdir(A, d, LONG)),
        (errno.ENAMETOOLONG, lambda: m.create(A, d, "é" * 128)),   # 256 bytes in UTF-8
        (errno.EINVAL, lambda: m.create(A, d, "")),
        (errno.EEXIST, lambda: m.create(A, d, "..")),
        (errno.EINVAL, lambda: m.symlink(A, d, "x/y", "t")),
        (errno.EINVAL, lambda: m.symlink(A, d, "s", "t\0")),
        (errno.EISDIR, lambda: m.unlink(A, d, ".")),
        (errno.EINVAL, lambda: m.unlink(A, d, "")),
        (errno.EINVAL, lambda: m.rmdir(A, d, ".")),
        (errno.EBUSY, lambda: m.rename(A, d, ".", d, "x")),
        (errno.EBUSY, lambda: m.rename(A, d, "f", d, "..")),
        (errno.ENAMETOOLONG, lambda: m.rename(A, d, "f", d, LONG)),
        (errno.EINVAL, lambda: m.link(A, f, d, "")),
        (errno.EINVAL, lambda: m.lookup(A, d, "a/b")),
        (errno.ENAMETOOLONG, lambda: m.lookup(A, d, LONG)),
        (errno.EINVAL, lambda: m.lookup(A, d, 42)),
        (errno.EINVAL, lambda: m.setxattr(A, f, "user.a\0b", b"v")),
        (errno.ERANGE, lambda: m.setxattr(A, f, "", b"v")),
        (errno.EINVAL, lambda: m.setxattr(A, f, "user.", b"v")),
        (errno.EINVAL, lambda: m.setxattr(A, f, "user.a", "not bytes")),
        (errno.EINVAL, lambda: m.setxattr(A, f, "user.a", b"v", 3)),
        # modes, flags, ids
        (errno.EINVAL, lambda: m.mkdir(A, d, "x", -1)),
        (errno.EINVAL, lambda: m.mkdir(A, d, "x", stat.S_IFREG | 0o755)),
        (errno.EINVAL, lambda: m.mkdir(A, d, "x", 0o777, umask=0o7777)),
        (errno.EINVAL, lambda: m.create(A, d, "x", stat.S_IFDIR | 0o644)),
        (errno.EINVAL, lambda: m.create(A, d, "x", 0o1000000)),
        (errno.EINVAL, lambda: m.create(A, d, "x", 0o644, os.O_WRONLY | os.O_RDWR)),
        (errno.EINVAL, lambda: m.create(A, d, "x", 0o644, 1 << 30)),
        (errno.EINVAL, lambda: m.create(A, d, "x", 0o644, os.O_RDONLY | os.O_DIRECTORY)),
        (errno.EOPNOTSUPP, lambda: m.open(A, f, os.O_RDWR | os.O_TMPFILE)),
        (errno.EINVAL, lambda: m.open(A, f, -1)),
        (errno.EINVAL, lambda: m.mknod(A, d, "x", 0o170000 | 0o644)),
        (errno.EINVAL, lambda: m.mknod(ROOT, d, "x", stat.S_IFCHR | 0o644, rdev=-1)),
        (errno.EINVAL, lambda: m.setattr(A, f, mode=0o1000000)),
        (errno.EINVAL, lambda: m.setattr(A, f, uid=-1)),
        (errno.EINVAL, lambda: m.setattr(A, f, gid=1 << 32)),
        (errno.EINVAL, lambda: m.setattr(A, f, size=-5)),
        (errno.EINVAL, lambda: m.setattr(A, f, atime="yesterday")),
        (errno.EINVAL, lambda: m.setattr(A, f, mtime=1.5)),
        (errno.EINVAL, lambda: m.setattr(A, f, session=b"short")),
        (errno.EFBIG, lambda: m.truncate(A, f, 1 << 64)),
        (errno.EINVAL, lambda: m.access(A, f, 8)),
        (errno.EINVAL, lambda: m.rename(A, d, "f", d, "g", 1 << 5)),
        (errno.EINVAL, lambda: m.readdir(A, d, limit=-1)),
        (errno.EINVAL, lambda: m.readdir(A, d, cursor=b"c" * 300)),
        (errno.EINVAL, lambda: m.close(A, f, b"bad-session")),
        (errno.EINVAL, lambda: m.set_layout(A, d, 12345, 1)),
        (errno.EINVAL, lambda: m.unlink(A.with_uuid(b"u" * 65), d, "f")),
        # unknown or wrong inodes
        (errno.ENOENT, lambda: m.getattr(A, MISSING)),
        (errno.ENOENT, lambda: m.lookup(A, MISSING, "x")),
        (errno.ENOENT, lambda: m.mkdir(A, MISSING, "x")),
        (errno.ENOENT, lambda: m.create(A, MISSING, "x")),
        (errno.ENOENT, lambda: m.setattr(A, MISSING, mode=0o600)),
        (errno.ENOENT, lambda: m.setattr(A, MISSING, size=0)),
        (errno.ENOENT, lambda: m.open(A, MISSING, os.O_RDONLY)),
        (errno.ENOENT, lambda: m.link(A, MISSING, d, "x")),
        (errno.ENOENT, lambda: m.rename(A, MISSING, "f", d, "x")),
        (errno.ENOENT, lambda: m.setxattr(A, MISSING, "user.a", b"v")),
        (errno.ENOENT, lambda: m.listxattr(A, MISSING)),
        (errno.ENOENT, lambda: m.readdir(A, MISSING)),
        (errno.ENOENT, lambda: m.close(A, MISSING, None, length=5)),
        (errno.EINVAL, lambda: m.getattr(A, 0)),
        (errno.EINVAL, lambda: m.getattr(A, -3)),
        (errno.EINVAL, lambda: m.getattr(A, 1 << 64)),
        (errno.EINVAL, lambda: m.getattr(A, "1")),
        (errno.ENOTDIR, lambda: m.mkdir(A, f, "x")),
        (errno.ENOTDIR, lambda: m.lookup(A, f, "x")),
        (errno.ENOTDIR, lambda: m.rename(A, d, "f", f, "x")),
        (errno.ENOTDIR, lambda: m.set_layout(A, f, 1 << 20, 1)),
        (errno.EINVAL, lambda: m.readlink(A, f)),
        (errno.ENOENT, lambda: m.resolve(A, "/no/such/path")),
        (errno.EINVAL, lambda: m.resolve(A, "/a\0b")),
        (errno.EINVAL, lambda: m.resolve(A, 7)),
    ]


async def test_bad_input_fails_cleanly_and_writes_nothing(meta):
    d = await meta.mkdir(ALICE, ROOT_INO, "d")
    f = await touch(meta, ALICE, d.ino, "f")
    await touch(meta, ALICE, d.ino, "g")
    await meta.setattr(ALICE, f.ino, atime=NOW)
    before = await dump(meta.engine)
    for i, (code, call) in enumerate(bad_calls(meta, d.ino, f.ino)):
        with pytest.raises(OSError) as e:
            await call()
        assert e.value.errno == code, f"case {i}: expected {errno.errorcode[code]}, got {e.value!r}"
        msg = str(e.value.strerror)
        assert msg and "\n" not in msg and len(msg) < 300, f"case {i}: message {msg!r}"
    assert await dump(meta.engine) == before


async def test_permission_failures_write_nothing(meta):
    d = await meta.mkdir(ALICE, ROOT_INO, "d", 0o755)
    f = await touch(meta, ALICE, d.ino, "f", 0o600)
    bob = Caller(1001, (1001,))
    before = await dump(meta.engine)
    for call in (lambda: meta.create(bob, d.ino, "x"), lambda: meta.unlink(bob, d.ino, "f"),
                 lambda: meta.setattr(bob, f.ino, mode=0o777), lambda: meta.truncate(bob, f.ino, 0),
                 lambda: meta.open(bob, f.ino, os.O_RDWR), lambda: meta.rename(bob, d.ino, "f", ROOT_INO, "f")):
        with pytest.raises(PermissionError):
            await call()
    assert await dump(meta.engine) == before
    assert meta.ctx.storage.calls == []  # a refused truncate never reached storage
