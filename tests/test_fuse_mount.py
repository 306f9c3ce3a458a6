"""The FUSE mount, through real syscalls on a real mount (`flyfs mount -f` in a
subprocess) of an in-process cluster; unmounted at the end even on failure.

Needs root and /dev/fuse (skipped otherwise)."""
from __future__ import annotations

import ctypes
import errno
import os
import pickle
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from flyfs.fuse.mount import is_mounted, unmount
from test_client_cluster import CHUNK, FlyCluster, fly, fs  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="FUSE tests need root and /dev/fuse")

USER = 12345  # an unprivileged uid/gid for permission tests (needs no passwd entry)


class Mount:
    """`flyfs mount -f` of a cluster at a fresh directory, as a subprocess."""

    def __init__(self, cluster: FlyCluster, root, options: str | None = None):
        self.cluster = cluster
        # Outside pytest's private (0700) tmp tree, so other users can reach the mount.
        self.path = tempfile.mkdtemp(prefix="flyfs-mnt-")
        os.chmod(self.path, 0o755)
        self.log = os.path.join(str(root), "mount.log")
        self.options = options
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Mount":
        args = [sys.executable, "-m", "flyfs.cli", "mount", "--cluster", self.cluster.mgmtd_address,
                self.path, "-f"]
        if self.options:
            args += ["-o", self.options]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mount failed:\n{open(self.log).read()[-3000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if is_mounted(self.path):
            ok, msg = unmount(self.path)
            assert ok, msg
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if is_mounted(self.path):
                    subprocess.run(["umount", "-l", self.path])
        if not is_mounted(self.path):
            os.rmdir(self.path)

    def p(self, *parts) -> str:
        return os.path.join(self.path, *parts)


@pytest.fixture(scope="module")
def mnt(fly, tmp_path_factory):
    m = Mount(fly, tmp_path_factory.mktemp("fuse")).start()
    try:
        yield m
    finally:
        m.stop()
    assert m.proc.returncode == 0, open(m.log).read()[-3000:]


@pytest.fixture
def d(mnt):
    name = "f-" + uuid.uuid4().hex[:8]
    os.mkdir(mnt.p(name))
    os.chmod(mnt.p(name), 0o777)
    return mnt.p(name)


def api_path(mnt: Mount, local: str) -> str:
    return "/" + os.path.relpath(local, mnt.path)


def run_as(uid: int, gids: list[int], fn):
    """Run fn() in a forked child with uid/gids (no exec); returns its result or raises its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            os.setgroups(gids[1:])
            os.setgid(gids[0])
            os.setuid(uid)
            try:
                out = ("ok", fn())
            except OSError as e:
                out = ("err", (e.errno, e.filename))
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "err":
        raise OSError(value[0], os.strerror(value[0]), value[1])
    return value


# ---- data -------------------------------------------------------------------------------------------

def test_read_write_across_chunks_and_page_cache(mnt, d, fs):
    payload = os.urandom(7 * CHUNK + 12345)
    p = os.path.join(d, "big")
    with open(p, "wb") as f:
        f.write(payload)
    assert os.stat(p).st_size == len(payload)
    with open(p, "rb") as f:
        assert f.read() == payload
    assert fs.read_bytes(api_path(mnt, p)) == payload      # what the cluster holds
    with open(p, "r+b") as f:                                # overwrite in place, read back on the fd
        f.seek(CHUNK - 2)
        f.write(b"XYZW")
        f.seek(CHUNK - 4)
        assert f.read(8) == payload[CHUNK - 4:CHUNK - 2] + b"XYZW" + payload[CHUNK + 2:CHUNK + 4]
    with open(p, "rb") as f:
        f.seek(CHUNK - 2)
        assert f.read(4) == b"XYZW"


def test_api_and_mount_see_each_other(mnt, d, fs):
    fs.write_bytes(api_path(mnt, os.path.join(d, "from_api")), b"api data")
    with open(os.path.join(d, "from_api"), "rb") as f:
        assert f.read() == b"api data"
    with open(os.path.join(d, "from_mount"), "wb") as f:
        f.write(b"mount data" * 1000)
    assert fs.read_bytes(api_path(mnt, os.path.join(d, "from_mount"))) == b"mount data" * 1000


def test_a_file_another_client_rewrote_is_read_afresh(mnt, d, fs):
    """Close-to-open through the kernel's page cache: a same-size rewrite by another
    client within the same second (libfuse's auto_cache, comparing whole-second
    mtimes and sizes, kept the old pages for good) is read at the next open."""
    p = os.path.join(d, "rewritten")
    for i in range(3):
        fs.write_bytes(api_path(mnt, p), bytes([65 + i]) * 5000)
        with open(p, "rb") as f:
            assert f.read() == bytes([65 + i]) * 5000
    with open(p, "r+b") as f:                       # this mount's own writes keep its cache valid
        f.write(b"Z" * 10)
    with open(p, "rb") as f:
        assert f.read() == b"Z" * 10 + b"C" * 4990
    assert fs.read_bytes(api_path(mnt, p)) == b"Z" * 10 + b"C" * 4990


def test_small_files_through_the_mount_are_inline_until_they_grow(mnt, d, fs, fly):
    """Files of up to inline_max bytes are held by the metadata service (no chunk write):
    rewritten by another client, read afresh at the next open; grown past the limit
    through the mount, moved to chunks with every byte kept."""
    from flyfs.metaserver import schema

    def inline_key(path):
        key = schema.inline_key(fs.stat(api_path(mnt, path)).st_ino)

        async def fn(txn):
            return await txn.get(key)
        return fly.run(fly._meta[2].engine.transact(fn))

    p = os.path.join(d, "small")
    for i in range(3):
        fs.write_bytes(api_path(mnt, p), bytes([65 + i]) * 3000)
        with open(p, "rb") as f:
            assert f.read() == bytes([65 + i]) * 3000
    with open(p, "r+b") as f:
        f.write(b"Z" * 10)
    want = b"Z" * 10 + b"C" * 2990
    with open(p, "rb") as f:
        assert f.read() == want
    assert fs.read_bytes(api_path(mnt, p)) == want and inline_key(p) is not None
    with open(p, "ab") as f:
        f.write(b"+" * 10000)
    want += b"+" * 10000
    assert inline_key(p) is None
    with open(p, "rb") as f:
        assert f.read() == want
    assert fs.read_bytes(api_path(mnt, p)) == want and os.stat(p).st_size == len(want)


def test_stat_ahead_after_a_listing_stays_right(mnt, d, fs):
    """`ls -l`: the stats after a listing are answered from attributes fetched a page at
    a time (stat-ahead); they are right, a change through the mount shows at once, and
    another client's change within the kernel's attribute timeout (1 s)."""
    names = [f"e{i:04d}" for i in range(600)]                  # more than one stat-ahead page
    for i, n in enumerate(names):
        fs.write_bytes(api_path(mnt, os.path.join(d, n)), b"x" * i)
    assert sorted(os.listdir(d)) == names
    for i, n in enumerate(names):
        st = os.lstat(os.path.join(d, n))
        assert st.st_size == i and stat.S_ISREG(st.st_mode), n
    os.listdir(d)
    os.chmod(os.path.join(d, "e0100"), 0o600)                   # through the mount: at once
    with open(os.path.join(d, "e0101"), "ab") as f:
        f.write(b"more")
    assert stat.S_IMODE(os.lstat(os.path.join(d, "e0100")).st_mode) == 0o600
    assert os.lstat(os.path.join(d, "e0101")).st_size == 101 + 4
    os.listdir(d)
    assert os.lstat(os.path.join(d, "e0200")).st_size == 200
    fs.write_bytes(api_path(mnt, os.path.join(d, "e0201")), b"y" * 7)   # another client
    deadline = time.monotonic() + 3
    while os.lstat(os.path.join(d, "e0201")).st_size != 7:
        assert time.monotonic() < deadline, "another client's change never showed"
        time.sleep(0.1)


def test_the_directory_reread_after_a_change_comes_from_the_change(mnt, d, fs, fly):
    """The kernel re-reads a directory's attributes after each change in it; the reply of
    the change (create, mkdir, mknod, symlink, rename, unlink, rmdir) serves that, with no
    metadata call, and the attributes are the server's."""
    svc = fly._meta[2]
    dir_ino = os.stat(d).st_ino
    resolved = []
    real = svc.resolve

    counting_on = [False]     # (the API's own stats below are not counted)

    async def counting(*args, **kw):
        node = await real(*args, **kw)
        if counting_on[0]:
            resolved.append(node.ino)
        return node

    def create(i):
        with open(os.path.join(d, f"c{i}"), "wb") as f:
            f.write(b"x" * i)

    changes = [create, lambda i: os.mkdir(os.path.join(d, f"m{i}")),
               lambda i: os.mkfifo(os.path.join(d, f"p{i}")),
               lambda i: os.symlink("c0", os.path.join(d, f"s{i}")),
               lambda i: os.rename(os.path.join(d, f"c{i}"), os.path.join(d, f"r{i}")),
               lambda i: os.unlink(os.path.join(d, f"r{i}")), lambda i: os.rmdir(os.path.join(d, f"m{i}"))]
    api_dir = api_path(mnt, d)
    svc.resolve = counting
    try:
        for change in changes:
            for i in range(3):
                counting_on[0] = True
                change(i)
                st = os.stat(d)
                counting_on[0] = False
                api = fs.stat(api_dir)      # (fuse-python passes whole seconds)
                assert (st.st_mtime, st.st_ctime, st.st_nlink, st.st_mode) == \
                    (int(api.st_mtime), int(api.st_ctime), api.st_nlink, api.st_mode)
    finally:
        del svc.resolve
    assert resolved and dir_ino not in resolved, "the directory was asked for after a change"
    # Anything else that changes a directory through the mount is not answered from a change.
    create(9)
    os.mkdir(os.path.join(d, "sub"))
    os.rename(os.path.join(d, "p0"), os.path.join(d, "p0r"))
    os.chmod(d, 0o750)
    st, api = os.stat(d), fs.stat(api_dir)
    assert (st.st_mtime, st.st_nlink, st.st_mode) == (int(api.st_mtime), api.st_nlink, api.st_mode)
    assert st.st_nlink == 3 and stat.S_IMODE(st.st_mode) == 0o750
    os.rename(os.path.join(d, "c9"), os.path.join(d, "sub", "c9"))     # across directories: both
    for where in (d, os.path.join(d, "sub")):
        st, api = os.stat(where), fs.stat(api_path(mnt, where))
        assert (st.st_mtime, st.st_ctime, st.st_nlink) == (int(api.st_mtime), int(api.st_ctime), api.st_nlink)


def test_the_reread_after_chmod_chown_utime_truncate_comes_from_the_change(mnt, d, fs, fly):
    """libfuse answers each SETATTR with a getattr of the path after the operation; the
    operation's own reply serves it, and the operation takes the inode from the kernel's
    lookup just before it: no path resolution of its own (9 for these four before)."""
    svc = fly._meta[2]
    p = os.path.join(d, "attrs")
    with open(p, "wb") as f:
        f.write(b"x" * 10)
    os.stat(p)
    resolved = []
    real = svc.resolve

    async def counting(*args, **kw):
        resolved.append(args)
        return await real(*args, **kw)

    ops = [lambda: os.chmod(p, 0o640), lambda: os.chown(p, 1234, 5678), lambda: os.truncate(p, 3),
           lambda: os.utime(p, ns=(1_500_000_000_000_000_000, 1_600_000_000_123_456_789))]
    svc.resolve = counting
    try:
        for op in ops:
            op()
    finally:
        del svc.resolve
    # One resolution of the path per operation, plus the kernel's own re-reads before some
    # of them (it drops a file's attributes after a chmod, say); not the libfuse re-read too.
    print("RESOLVED", len(resolved))
    assert len(resolved) < 2 * len(ops), [r[1:] for r in resolved]
    st, api = os.stat(p), fs.stat(api_path(mnt, p))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime) == \
        (0o640, 1234, 5678, 3, 1_600_000_000) == \
        (stat.S_IMODE(api.st_mode), api.st_uid, api.st_gid, api.st_size, int(api.st_mtime))
    # A name replaced in between is resolved again: the change goes to what it names now.
    other = os.path.join(d, "other")
    with open(other, "wb") as f:
        f.write(b"y")
    old_ino = os.stat(p).st_ino
    os.rename(other, p)
    os.chmod(p, 0o604)
    assert os.stat(p).st_ino != old_ino and stat.S_IMODE(fs.stat(api_path(mnt, p)).st_mode) == 0o604


def test_open_flags(mnt, d):
    p = os.path.join(d, "flags")
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"0123456789")
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.write(fd, b"ab")
    os.close(fd)
    assert open(p, "rb").read() == b"ab"
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(a, b"1")
    os.write(b, b"2")
    os.write(a, b"3")
    os.close(a)
    os.close(b)
    assert open(p, "rb").read() == b"ab123"
    fd = os.open(p, os.O_RDONLY)
    with pytest.raises(OSError) as ei:
        os.write(fd, b"x")
    assert ei.value.errno == errno.EBADF
    os.close(fd)
    with pytest.raises(FileNotFoundError):
        os.open(os.path.join(d, "missing"), os.O_RDONLY)
    with pytest.raises(NotADirectoryError):
        os.open(os.path.join(p, "x"), os.O_RDONLY)


def test_truncate_and_ftruncate(mnt, d):
    p = os.path.join(d, "trunc")
    data = os.urandom(3 * CHUNK)
    open(p, "wb").write(data)
    os.truncate(p, CHUNK + 10)
    assert os.stat(p).st_size == CHUNK + 10
    assert open(p, "rb").read() == data[:CHUNK + 10]
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 2 * CHUNK)
    assert os.fstat(fd).st_size == 2 * CHUNK
    assert os.pread(fd, 2 * CHUNK, 0) == data[:CHUNK + 10] + bytes(CHUNK - 10)
    os.pwrite(fd, b"end", 2 * CHUNK)
    os.ftruncate(fd, 5)
    os.close(fd)
    assert open(p, "rb").read() == data[:5]


def test_fsync_and_statvfs(mnt, d, fs):
    p = os.path.join(d, "synced")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x" * 5000)
    os.fsync(fd)
    assert fs.stat(api_path(mnt, p)).st_size == 5000      # reported before close
    os.close(fd)
    dfd = os.open(d, os.O_RDONLY)                          # fsync of a directory (sqlite does it)
    os.fsync(dfd)
    os.fsync(dfd)
    os.close(dfd)
    sv = os.statvfs(mnt.path)
    assert sv.f_namemax == 255 and sv.f_blocks > 0


# ---- names and attributes ----------------------------------------------------------------------------------

def test_chmod_chown_utimens_nanoseconds(mnt, d, fs):
    p = os.path.join(d, "attrs")
    open(p, "wb").close()
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    os.chown(p, 321, 654)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (321, 654)
    os.chown(p, -1, 999)
    assert (os.stat(p).st_uid, os.stat(p).st_gid) == (321, 999)
    ns = (1_600_000_000_111_222_333, 1_650_000_000_444_555_666)
    os.utime(p, ns=ns)
    api = fs.stat(api_path(mnt, p))
    assert (api.st_atime_ns, api.st_mtime_ns) == ns           # nanoseconds reach the metadata exactly
    st = os.stat(p)
    # libfuse 2 (fuse-python) hands the kernel whole seconds only.
    assert (st.st_atime_ns // 10**9, st.st_mtime_ns // 10**9) == (ns[0] // 10**9, ns[1] // 10**9)
    # only mtime (atime UTIME_OMIT), as touch -m, tar and rsync do
    subprocess.run(["touch", "-m", "-d", "@1700000000", p], check=True)
    api = fs.stat(api_path(mnt, p))
    assert (api.st_atime_ns, api.st_mtime_ns) == (ns[0], 1_700_000_000 * 10**9)
    subprocess.run(["touch", "-a", "-d", "@1400000000", p], check=True)
    api = fs.stat(api_path(mnt, p))
    assert (api.st_atime_ns, api.st_mtime_ns) == (1_400_000_000 * 10**9, 1_700_000_000 * 10**9)
    before = time.time()
    os.utime(p)                                               # UTIME_NOW
    assert fs.stat(api_path(mnt, p)).st_mtime >= before - 5


def test_link_symlink_readlink_rename(mnt, d):
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    open(a, "wb").write(b"A")
    open(b, "wb").write(b"B")
    os.rename(a, b)                                     # replace
    assert open(b, "rb").read() == b"A" and not os.path.exists(a)
    os.link(b, os.path.join(d, "hard"))
    assert os.stat(b).st_nlink == 2 and os.stat(b).st_ino == os.stat(os.path.join(d, "hard")).st_ino
    os.symlink("b", os.path.join(d, "sym"))
    assert os.readlink(os.path.join(d, "sym")) == "b"
    assert open(os.path.join(d, "sym"), "rb").read() == b"A"
    assert stat.S_ISLNK(os.lstat(os.path.join(d, "sym")).st_mode)
    os.mkdir(os.path.join(d, "dir1"))
    open(os.path.join(d, "dir1", "f"), "wb").write(b"in dir")
    os.rename(os.path.join(d, "dir1"), os.path.join(d, "dir2"))
    assert open(os.path.join(d, "dir2", "f"), "rb").read() == b"in dir"
    os.mkdir(os.path.join(d, "empty"))
    os.rename(os.path.join(d, "dir2"), os.path.join(d, "empty"))   # replaces an empty directory
    assert os.listdir(os.path.join(d, "empty")) == ["f"]
    with pytest.raises(OSError) as ei:
        os.rename(d, os.path.join(d, "empty", "loop"))
    assert ei.value.errno == errno.EINVAL
    libc = ctypes.CDLL(None, use_errno=True)       # renameat2(RENAME_NOREPLACE)
    open(os.path.join(d, "c"), "wb").close()
    assert libc.renameat2(-100, os.path.join(d, "c").encode(), -100, b.encode(), 1) == -1
    assert ctypes.get_errno() == errno.EEXIST
    assert open(b, "rb").read() == b"A"


def test_mkfifo_mknod(mnt, d):
    os.mkfifo(os.path.join(d, "fifo"), 0o640)
    st = os.lstat(os.path.join(d, "fifo"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 & ~_umask()
    os.mknod(os.path.join(d, "chr"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.lstat(os.path.join(d, "chr"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(os.path.join(d, "reg"), 0o644 | stat.S_IFREG)
    assert stat.S_ISREG(os.lstat(os.path.join(d, "reg")).st_mode)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_unlink_rmdir(mnt, d):
    p = os.path.join(d, "f")
    open(p, "wb").write(b"keep reading")
    fd = os.open(p, os.O_RDONLY)
    os.unlink(p)
    assert not os.path.exists(p)
    assert os.pread(fd, 100, 0) == b"keep reading"      # open files outlive their name
    os.close(fd)
    os.mkdir(os.path.join(d, "sub"))
    open(os.path.join(d, "sub", "x"), "wb").close()
    with pytest.raises(OSError) as ei:
        os.rmdir(os.path.join(d, "sub"))
    assert ei.value.errno == errno.ENOTEMPTY
    os.unlink(os.path.join(d, "sub", "x"))
    os.rmdir(os.path.join(d, "sub"))
    with pytest.raises(IsADirectoryError):
        os.unlink(d)
    with pytest.raises(FileNotFoundError):
        os.rmdir(os.path.join(d, "sub"))


def test_name_lengths(mnt, d):
    ok = os.path.join(d, "n" * 255)
    open(ok, "wb").write(b"x")
    assert "n" * 255 in os.listdir(d)
    with pytest.raises(OSError) as ei:
        open(os.path.join(d, "n" * 256), "wb")
    assert ei.value.errno == errno.ENAMETOOLONG


def test_xattrs(mnt, d):
    p = os.path.join(d, "x")
    open(p, "wb").close()
    os.setxattr(p, "user.color", b"blue")
    assert os.getxattr(p, "user.color") == b"blue"
    os.setxattr(p, "user.name", "é€".encode())
    assert os.getxattr(p, "user.name") == "é€".encode()
    assert sorted(os.listxattr(p)) == ["user.color", "user.name"]
    with pytest.raises(OSError) as ei:
        os.setxattr(p, "user.color", b"x", os.XATTR_CREATE)
    assert ei.value.errno == errno.EEXIST
    os.removexattr(p, "user.name")
    os.removexattr(p, "user.color")
    with pytest.raises(OSError) as ei:
        os.getxattr(p, "user.color")
    assert ei.value.errno == errno.ENODATA
    acl = (b"\x02\0\0\0" + b"\x01\0\x06\0\xff\xff\xff\xff"    # the ACL cp -a sets: user::rw-
           + b"\x04\0\x04\0\xff\xff\xff\xff" + b"\x20\0\x04\0\xff\xff\xff\xff")  # group::r-- other::r--
    for _ in range(3):
        with pytest.raises(OSError) as ei:
            os.setxattr(p, "system.posix_acl_access", acl)
        assert ei.value.errno == errno.EINVAL
    assert open(mnt.log).read().count("UnicodeDecodeError") == 1   # logged once, not per file


def test_readdir_of_a_big_directory(mnt, d, fs):
    names = sorted(f"e{i:05d}" for i in range(1100))     # more than one metadata page
    for n in names:
        fs.mknod(api_path(mnt, os.path.join(d, n)))
    assert sorted(os.listdir(d)) == names
    with os.scandir(d) as it:
        assert sum(1 for e in it if e.is_file()) == 1100


# ---- permissions as an unprivileged user --------------------------------------------------------------------

def test_permissions_as_another_user(mnt, d):
    secret = os.path.join(d, "secret")
    open(secret, "wb").write(b"root only")
    os.chmod(secret, 0o600)
    locked = os.path.join(d, "locked")
    os.mkdir(locked, 0o755)
    public = os.path.join(d, "public")
    open(public, "wb").write(b"for all")
    assert run_as(USER, [USER], lambda: open(public, "rb").read()) == b"for all"  # the mount is reachable
    with pytest.raises(PermissionError):
        run_as(USER, [USER], lambda: open(secret, "rb").read())
    with pytest.raises(PermissionError):
        run_as(USER, [USER], lambda: open(os.path.join(locked, "new"), "wb").close())
    mine = os.path.join(d, "mine")
    assert run_as(USER, [USER], lambda: (open(mine, "wb").write(b"hi"), os.stat(mine).st_uid)[1]) == USER
    assert (os.stat(mine).st_uid, os.stat(mine).st_gid) == (USER, USER)
    # the sticky directory: others' files cannot be removed by this user
    sticky = os.path.join(d, "tmp")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    open(os.path.join(sticky, "roots"), "wb").close()
    with pytest.raises(PermissionError):
        run_as(USER, [USER], lambda: os.unlink(os.path.join(sticky, "roots")))
    # supplementary groups reach the metadata service: a group-writable directory
    shared = os.path.join(d, "shared")
    os.mkdir(shared)
    os.chown(shared, 0, 4242)
    os.chmod(shared, 0o770)
    with pytest.raises(PermissionError):
        run_as(USER, [USER], lambda: open(os.path.join(shared, "g"), "wb").close())
    run_as(USER, [USER, 4242], lambda: open(os.path.join(shared, "g"), "wb").write(b"group"))
    assert os.stat(os.path.join(shared, "g")).st_uid == USER


# ---- the command line -------------------------------------------------------------------------------------------

def test_mount_daemon_and_umount_commands(fly, tmp_path):
    mp = tmp_path / "m2"
    mp.mkdir()
    log = tmp_path / "m2.log"
    r = subprocess.run([sys.executable, "-m", "flyfs.cli", "mount", "--cluster", fly.mgmtd_address,
                        "--meta", fly.meta_address, str(mp), "--log-file", str(log)],
                       capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert is_mounted(str(mp))
        assert os.statvfs(str(mp)).f_namemax == 255
        r2 = subprocess.run([sys.executable, "-m", "flyfs.cli", "mount", "--cluster", fly.mgmtd_address,
                             "--meta", fly.meta_address, str(mp)], capture_output=True, text=True, timeout=60)
        assert r2.returncode != 0 and "already mounted" in r2.stderr
    finally:
        u = subprocess.run([sys.executable, "-m", "flyfs.cli", "umount", str(mp)], capture_output=True,
                           text=True, timeout=60)
    assert u.returncode == 0, u.stderr
    deadline = time.monotonic() + 10
    while is_mounted(str(mp)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(str(mp))
    u2 = subprocess.run([sys.executable, "-m", "flyfs.cli", "umount", str(mp)], capture_output=True, text=True)
    assert u2.returncode == 1 and "nothing is mounted" in u2.stderr


def test_mount_reports_a_bad_cluster(tmp_path):
    mp = tmp_path / "m3"
    mp.mkdir()
    r = subprocess.run([sys.executable, "-m", "flyfs.cli", "mount", "--cluster", "127.0.0.1:1", str(mp),
                        "-f", "--connect-timeout", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "cannot reach the cluster at 127.0.0.1:1" in r.stderr
    assert not is_mounted(str(mp))
    r = subprocess.run([sys.executable, "-m", "flyfs.cli", "mount", "--cluster", "127.0.0.1:1", str(mp),
                        "--connect-timeout", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "cannot reach the cluster" in r.stderr    # the daemon's error, relayed
    assert not is_mounted(str(mp))
    r = subprocess.run([sys.executable, "-m", "flyfs.cli", "mount", "--cluster", "nonsense", str(mp)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bad cluster address" in r.stderr


def test_randomized_small_files_between_a_strict_mount_and_the_api(fly, fs, tmp_path):
    """Writes, appends and truncates around inline_max, by a mount with no kernel attribute
    or name caching (strict close-to-open) and by the API in turn, each closing before the
    other opens; after every step both read back what a local file holds."""
    import random
    m = Mount(fly, tmp_path, options="attr_timeout=0,entry_timeout=0").start()
    try:
        rnd = random.Random(7)
        limit = fly.inline_max
        for k in range(3):
            name = f"rand-{uuid.uuid4().hex[:6]}"
            local, mounted, api = tmp_path / name, os.path.join(m.path, name), "/" + name
            local.write_bytes(b"")
            fs.write_bytes(api, b"")
            for step in range(60):
                via_mount = rnd.random() < 0.5
                op = rnd.choice(["write", "write", "append", "truncate"])
                size = local.stat().st_size
                if op == "truncate":
                    n = rnd.choice([0, rnd.randrange(limit + 100), size + 50])
                    os.truncate(mounted, n) if via_mount else fs.truncate(api, n)
                    os.truncate(local, n)
                else:
                    data = os.urandom(rnd.choice([1, 100, rnd.randrange(1, limit + 500)]))
                    off = size if op == "append" else rnd.randrange(size + 1 if size < limit else limit)
                    if via_mount:
                        with open(mounted, "r+b") as f:
                            f.seek(off)
                            f.write(data)
                    else:
                        with fs.open(api, "r+b") as f:
                            f.seek(off)
                            f.write(data)
                    with open(local, "r+b") as g:
                        g.seek(off)
                        g.write(data)
                want = local.read_bytes()
                with open(mounted, "rb") as f:
                    assert f.read() == want, f"file {k} step {step} ({op}, mount read)"
                assert fs.read_bytes(api) == want, f"file {k} step {step} ({op}, API read)"
    finally:
        m.stop()
