"""FUSE operations (fuse-python, libfuse 2 high-level, path based) over flyfs.client.

Every operation runs as the calling process's user: uid and gid from the
FUSE request context, supplementary groups from /proc/PID/status, passed to
the metadata service (which checks permissions; the kernel checks them too,
with `default_permissions`). Open files are objects of `file_class`: each
holds a client Handle (its write session), and reads/writes go through it.

Writes are write-behind (AsyncFileSystem.write_behind): contiguous 128 KiB
FUSE writes are coalesced into larger chunk writes and several are in
flight per file; close(2) (FUSE flush) and fsync wait for them and report
the length, and return any write error, as NFS does. A write that only
extends the open file's buffer is done in the FUSE thread
(AsyncFileSystem.write_buffered), with no hop to the client loop.

Reads of an open file that run sequentially are served from a read-ahead
(client.io.ReadAhead, per open file, up to ClientConfig.readahead bytes
ahead, fetched on the client loop): most 128 KiB FUSE reads then cost a
copy in the FUSE thread instead of a hop and a storage round trip. Blocks
are dropped when this client changes the file, are never older than
size_revalidate, and live only while the file is open (close-to-open, as
the kernel's own page cache); random reads go straight to storage.

Limits of libfuse 2 / fuse-python, measured or read in its C glue:
- getattr hands the kernel whole seconds only (fuse-python fills tv_sec, not
  tv_nsec); utimensat's nanoseconds are stored exactly (the client API shows
  them) but stat(2) through the mount shows them truncated to the second;
- utimensat setting only one of atime/mtime (touch -m, tar, rsync) is dropped
  by libfuse unless a flag fuse-python never sets is on: `enable_utime_omit`
  sets it at mount time (see there);
- xattr values must be valid UTF-8 through the mount (fuse-python passes them
  as str both ways): others fail with EINVAL when set, EOPNOTSUPP when read;
  the client API takes any bytes;
- renameat2: RENAME_NOREPLACE works (the kernel checks the target),
  RENAME_EXCHANGE is refused with EINVAL (libfuse 2 has no flags);
- libfuse gives each path its own kernel inode: after link(2) the other
  path's cached st_nlink may lag for attr_timeout (st_ino is right);
- an open file that is unlinked is kept as a hidden ".fuse_hidden*" entry
  until its last close (libfuse's default);
- fsyncdir is not implemented: fuse-python 1.0.9 crashes calling it.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat as stat_mod
import threading
import time

import fuse as fusepy  # fuse-python: absolute import, never this package (flyfs.fuse)

if not hasattr(fusepy, "Fuse"):  # e.g. a script run from inside flyfs/, where 'fuse' is flyfs/fuse
    raise ImportError(f"'import fuse' found {getattr(fusepy, '__file__', fusepy)!r}, not fuse-python; "
                      "do not run flyfs with its package directory on sys.path")
fusepy.fuse_python_api = (0, 2)

from ..client.fs import NOW, FileSystem  # noqa: E402

log = logging.getLogger("flyfs.fuse")

__all__ = ["FlyFuse", "fuse_stat"]

NS = 1_000_000_000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_XATTR_OWN = ("user.", "trusted.")
ATTR_AGE = 0.5  # fgetattr right after open/create answers from the attributes open returned
# Stat-ahead (`ls -l`, `find -ls`, `du`): a stat that misses in a directory listed in the
# last LISTED_AGE seconds, with nothing changed through the mount since, fetches the
# attributes of the next AHEAD entries of the listing in one call; each is then served
# once, within AHEAD_TTL (the kernel's attr_timeout) and only while no operation that
# may change anything has run (a workload that changes files as it goes gets none).
AHEAD = 256
AHEAD_TTL = 1.0
LISTED_AGE = 5.0
_READ_ONLY = frozenset({"getattr", "readdir", "opendir", "releasedir", "readlink", "statfs", "access",
                        "getxattr", "listxattr", "read", "fgetattr"})
_changes = [0]  # bumped before and after every other operation (stat-ahead results older are not used)
# The kernel re-reads a directory's attributes after every change in it (FUSE drops them):
# a create, mkdir, mknod, symlink, unlink, rmdir or rename answers that from the attributes it
# returned itself, once, within DIR_AGE, and only while no other operation that may
# change a directory has run through the mount. (The kernel re-reads at its next step in
# that directory, within milliseconds; the answer then stays in its cache for attr_timeout.)
DIR_AGE = 0.2
_DIR_CHANGING = frozenset({"mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "chmod",
                           "chown", "truncate", "utimens", "setxattr", "removexattr"})
_dir_changes = [0]  # bumped before and after each of those (and each create)


def _errno(e: BaseException) -> int:
    if isinstance(e, OSError) and e.errno:
        return e.errno
    if isinstance(e, ValueError):  # e.g. a closed handle
        return errno.EBADF
    return errno.EIO


_kept: set[int] = set()


def keep_thread_state() -> None:
    """Keep this FUSE worker thread's Python thread state from one request to the next.

    fuse-python wraps every callback in PyGILState_Ensure/Release, and for a
    thread Python did not start, Release deletes the thread state (and frees
    its frame stack) each time: every request then pays for a fresh one
    (an mmap, munmap and gettid per request, measured with strace) and loses
    its thread-locals. One extra Ensure, never released, keeps it. A thread
    libfuse ends leaves its small state behind, as an exiting thread that Python
    did not start does anyway."""
    ident = threading.get_ident()
    if ident not in _kept:
        ctypes.pythonapi.PyGILState_Ensure()
        _kept.add(ident)


def guard(fn):
    """Return -errno for a failure (fuse-python's own wrapper turns only OSError with an errno
    into one; anything else would become EINVAL)."""
    changes = fn.__name__ not in _READ_ONLY
    dir_changes = fn.__name__ in _DIR_CHANGING

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        if threading.get_ident() not in _kept:
            keep_thread_state()
        if changes:
            _changes[0] += 1
        if dir_changes:
            _dir_changes[0] += 1
        try:
            return fn(*args, **kw)
        except OSError as e:
            if not e.errno:
                log.warning("%s%r: %r", fn.__name__, args[1:3], e)
            return -_errno(e)
        except Exception as e:
            log.exception("%s%r failed", fn.__name__, args[1:3])
            return -_errno(e)
        finally:
            if changes:
                _changes[0] += 1
            if dir_changes:
                _dir_changes[0] += 1
    return wrapper


def fuse_stat(n) -> fusepy.Stat:
    """A fuse.Stat from a metadata Inode."""
    blk = n.layout.chunk_size if n.layout and n.layout.chunk_size else 4096
    return fusepy.Stat(st_mode=n.mode, st_ino=n.ino, st_dev=0, st_nlink=n.nlink, st_uid=n.uid,
                       st_gid=n.gid, st_size=n.size, st_atime=n.atime // NS, st_mtime=n.mtime // NS,
                       st_ctime=n.ctime // NS, st_rdev=n.rdev, st_blocks=(n.size + 511) // 512,
                       st_blksize=min(max(blk, 4096), 1 << 20))


def _time(ts):
    if ts is None:
        return None
    if ts.tv_nsec == UTIME_OMIT:
        return None
    if ts.tv_nsec == UTIME_NOW:
        return NOW
    return ts.tv_sec * NS + ts.tv_nsec


def _xattr_str(value: bytes) -> str | None:
    """The value as fuse-python wants it back: a str that it encodes as strict
    UTF-8 (measured: a str with surrogate escapes fails with ERANGE, bytes
    with EINVAL). None when the value is not UTF-8 (set through the API)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def enable_utime_omit() -> bool:
    """Let libfuse pass utimensat calls that set only one of atime/mtime.

    libfuse 2.9 forwards such a SETATTR only when the file system declared
    `flag_utime_omit_ok`, which fuse-python never sets: without it `touch -m`,
    tar and rsync restoring mtimes (atime UTIME_OMIT) are silently dropped.
    The flag is copied into libfuse's private `struct fuse` at mount time, so
    it is set there, from the init callback (the FUSE context knows the
    struct). The layout is that of the libfuse 2.9 bundled with fuse-python;
    several known fields are checked first and nothing is written unless all
    match. Returns whether the flag is now set.
    """
    import ctypes
    import struct as cstruct

    path = next((line.split()[-1] for line in open("/proc/self/maps") if "libfuse" in line
                 and ".so.2" in line), None)
    if path is None:
        return False
    lib = ctypes.CDLL(path)  # the already loaded library (same handle, same state)
    lib.fuse_get_context.restype = ctypes.POINTER(ctypes.c_void_p)
    ctx = lib.fuse_get_context()
    if not ctx or not ctx[0]:
        return False
    base = ctx[0]
    # struct fuse (libfuse 2.9, x86_64): conf at 144 (entry, negative, attr timeouts at
    # +16, +24, +32; use_ino at +68; auto_cache at +96), fs at 272, nullpath_ok at 280,
    # utime_omit_ok at 284.
    raw = ctypes.string_at(base, 288)
    entry, negative, attr = cstruct.unpack_from("ddd", raw, 144 + 16)
    use_ino, = cstruct.unpack_from("i", raw, 144 + 68)
    auto_cache, = cstruct.unpack_from("i", raw, 144 + 96)
    fs_ptr, nullpath_ok, omit_ok = cstruct.unpack_from("Qii", raw, 272)
    opts = _MOUNT_OPTS
    expected = (float(opts.get("entry_timeout", 1.0)), float(opts.get("negative_timeout", 0.0)),
                float(opts.get("attr_timeout", 1.0)), int("use_ino" in opts), int("auto_cache" in opts))
    if (entry, negative, attr, use_ino, auto_cache) != expected or not fs_ptr or nullpath_ok not in (0, 1) \
            or omit_ok not in (0, 1):
        log.warning("libfuse layout not recognised; utimensat with UTIME_OMIT stays unsupported")
        return False
    ctypes.c_int.from_address(base + 284).value = 1
    return True


_MOUNT_OPTS: dict[str, str] = {}


def set_mount_options(options: str) -> None:
    """Record the -o options the mount was made with (enable_utime_omit checks them)."""
    _MOUNT_OPTS.clear()
    for item in options.split(","):
        k, _, v = item.partition("=")
        _MOUNT_OPTS[k] = v


class _Dir:
    """An open directory: the page being listed and where the next one starts."""

    __slots__ = ("ino", "parent", "fs", "page", "cursor", "done", "next_off")

    def __init__(self, node, fs: FileSystem):
        self.ino = node.ino
        self.parent = node.parent or node.ino  # glibc hides entries with d_ino 0
        self.fs = fs
        self.reset()

    def reset(self) -> None:
        self.page: list[tuple[int, str, int, int]] = []   # (offset, name, type, ino)
        self.cursor = b""
        self.done = False
        self.next_off = 3  # 1 and 2 are "." and ".."


class FlyFuse(fusepy.Fuse):
    """The flyfs file system for fuse-python (multithreaded)."""

    def __init__(self, fs: FileSystem, *args, on_init=None, **kw):
        super().__init__(*args, **kw)
        self.fs = fs
        self.multithreaded = True
        self.on_init = on_init
        self._views: dict[tuple, FileSystem] = {}
        self._groups: dict[int, tuple[float, int, tuple[int, ...]]] = {}
        self._lock = threading.Lock()
        self._ahead: dict[tuple, tuple] = {}    # ((uid, gids), path) -> (Inode, _changes then, until)
        self._listed: dict[tuple, tuple[int, float, int]] = {}  # ((uid, gids), dir) -> (ino, until, _changes)
        self._dirs_after: dict[tuple, tuple] = {}   # ((uid, gids), dir) -> (Inode, _dir_changes, until)
        self._inos: dict[tuple, tuple] = {}         # ((uid, gids), path) -> (ino, _changes) of a getattr
        self.file_class = _file_class(self)

    # ---- who is asking ------------------------------------------------------------------------------
    def _caller_groups(self, pid: int, gid: int) -> tuple[int, ...]:
        now = time.monotonic()
        hit = self._groups.get(pid)
        if hit is not None and hit[0] > now and hit[1] == gid:
            return hit[2]
        extra: list[int] = []
        if pid > 0:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("Groups:"):
                            extra = [int(g) for g in line.split()[1:]]
                            break
            except (OSError, ValueError):
                pass
        gids = (gid,) + tuple(g for g in extra if g != gid)
        if len(self._groups) > 4096:
            self._groups.clear()
        self._groups[pid] = (now + 1.0, gid, gids)
        return gids

    def who(self) -> FileSystem:
        """The client acting as the caller of the current FUSE request."""
        ctx = self.GetContext()
        uid, gid, pid = ctx["uid"], ctx["gid"], ctx["pid"]
        key = (uid, self._caller_groups(pid, gid))
        v = self._views.get(key)
        if v is None:
            with self._lock:
                if len(self._views) > 1024:
                    self._views.clear()
                v = self._views[key] = self.fs.as_user(*key)
        return v

    def run(self, name: str, *args, **kw):
        return self.who()._run_core(name, *args, **kw)

    # ---- lifecycle -------------------------------------------------------------------------------------
    def fsinit(self):
        try:
            if not enable_utime_omit():
                log.warning("utimensat setting only atime or only mtime will be ignored by libfuse")
        except Exception:
            log.exception("enabling UTIME_OMIT support")
        if self.on_init is not None:
            try:
                self.on_init()
            except Exception:
                log.exception("mount init hook failed")

    def fsdestroy(self):
        try:
            self.fs.close()
        except Exception:
            log.exception("closing the client at unmount")

    # ---- attributes ------------------------------------------------------------------------------------
    @guard
    def getattr(self, path):
        fs = self.who()
        key = (fs.user, path)
        seen = _changes[0]
        hit = self._ahead.pop(key, None)
        if hit is not None and hit[1] == seen and hit[2] > time.monotonic():
            n = fs.core._overlay(hit[0])
        else:
            n = None
            if self._dirs_after:
                hit = self._dirs_after.pop(key, None)
                if hit is not None and hit[1] == _dir_changes[0] and hit[2] > time.monotonic():
                    n = hit[0]
            if n is None:
                n = fs.core.getattr_now(path, False)        # from this thread when it can
                if n is None:
                    n = fs._run_core("getattr", path, False)
                self._stat_ahead(fs, path)
        if len(self._inos) > 65536:
            self._inos.clear()
        self._inos[key] = (n.ino, seen)   # for a chmod/chown/truncate/utimens that follows at once
        return fuse_stat(n)

    def _stat_ahead(self, fs: FileSystem, path: str) -> None:
        head, _, name = path.rpartition("/")
        head = head or "/"
        listed = self._listed.get((fs.user, head))
        seen = _changes[0]
        if listed is None or listed[1] < time.monotonic() or listed[2] != seen or not name:
            return
        try:
            entries, _ = fs._run_core("readdir_page", listed[0], os.fsencode(name), AHEAD, True, head)
        except OSError:
            return
        until = time.monotonic() + AHEAD_TTL
        if len(self._ahead) > 65536:
            self._ahead.clear()
        prefix = head.rstrip("/") + "/"
        for e in entries:
            if e.attr is not None:
                self._ahead[(fs.user, prefix + os.fsdecode(e.name))] = (e.attr, seen, until)

    @guard
    def access(self, path, mode):
        self.run("check_access", path, mode)
        return 0

    # chmod, chown, truncate, utimens: libfuse's high-level API answers the kernel's SETATTR
    # with a getattr of the path right after the operation; the attributes the operation's
    # own transaction returned answer it (as the low-level API would reply with them), once,
    # within DIR_AGE, while no other changing operation ran through the mount.
    # The path is not resolved again when the kernel's lookup for this very call just
    # answered it (no other changing operation ran through the mount in between: the
    # guard's bump for this one only): the inode it named then is the one the kernel means.
    def _setattr(self, path, **kw):
        fs = self.who()
        key = (fs.user, path)
        seen = self._inos.pop(key, None)
        ino = seen[0] if seen is not None and seen[1] == _changes[0] - 1 else None
        n = fs._run_core("setattr", path, follow_symlinks=False, ino=ino, **kw)
        if len(self._ahead) > 65536:
            self._ahead.clear()
        self._ahead[key] = (n, _changes[0] + 1, time.monotonic() + DIR_AGE)
        return 0

    @guard
    def chmod(self, path, mode):
        return self._setattr(path, mode=mode & 0o7777)

    @guard
    def chown(self, path, uid, gid):
        uid = None if uid in (-1, 0xFFFFFFFF) else uid
        gid = None if gid in (-1, 0xFFFFFFFF) else gid
        if uid is None and gid is None:
            return 0
        return self._setattr(path, uid=uid, gid=gid)

    @guard
    def truncate(self, path, size):
        return self._setattr(path, size=size)

    @guard
    def utimens(self, path, ts_acc, ts_mod):
        atime, mtime = _time(ts_acc), _time(ts_mod)
        if atime is None and mtime is None:
            return 0
        return self._setattr(path, atime=atime, mtime=mtime)

    @guard
    def statfs(self):
        st = self.run("statfs")
        return fusepy.StatVfs(f_bsize=st.bsize, f_frsize=st.frsize, f_blocks=st.blocks, f_bfree=st.bfree,
                              f_bavail=st.bavail, f_files=st.files, f_ffree=st.ffree, f_favail=st.ffree,
                              f_flag=0, f_namemax=st.namemax)

    # ---- names -------------------------------------------------------------------------------------------
    @guard
    def readlink(self, path):
        return self.run("readlink", path)

    def _changed_in(self, path: str, dir_after, seen: int, user=None) -> None:
        """Keep the attributes a change in directory dirname(path) returned for the kernel's
        re-read of that directory (see _DIR_CHANGING): valid while _dir_changes stays `seen`."""
        if dir_after is None:
            return
        if len(self._dirs_after) > 4096:
            self._dirs_after.clear()
        key = (user or self.who().user, path.rpartition("/")[0] or "/")
        self._dirs_after[key] = (dir_after, seen, time.monotonic() + DIR_AGE)

    # (each of these runs inside guard's bump of _dir_changes: + 1 is its value once it is done)
    @guard
    def mknod(self, path, mode, dev):
        seen = _dir_changes[0] + 1
        self._changed_in(path, self.run("mknod", path, mode, dev, umask=0, with_dir=True)[1], seen)
        return 0

    @guard
    def mkdir(self, path, mode):
        seen = _dir_changes[0] + 1
        self._changed_in(path, self.run("mkdir", path, mode, umask=0, with_dir=True)[1], seen)
        return 0

    @guard
    def unlink(self, path):
        seen = _dir_changes[0] + 1
        self._changed_in(path, self.run("unlink", path, with_dir=True), seen)
        return 0

    @guard
    def rmdir(self, path):
        seen = _dir_changes[0] + 1
        self._changed_in(path, self.run("rmdir", path, with_dir=True), seen)
        return 0

    @guard
    def symlink(self, target, path):
        seen = _dir_changes[0] + 1
        self._changed_in(path, self.run("symlink", target, path, with_dir=True)[1], seen)
        return 0

    @guard
    def rename(self, old, new):
        seen = _dir_changes[0] + 1
        dir_after, new_dir_after = self.run("rename", old, new, with_dir=True)
        self._changed_in(old, dir_after, seen)
        self._changed_in(new, new_dir_after, seen)
        return 0

    @guard
    def link(self, target, path):
        self.run("link", target, path)
        return 0

    # ---- directories -------------------------------------------------------------------------------------
    @guard
    def opendir(self, path):
        v = self.who()
        n = v._run_core("getattr", path, True)
        if not stat_mod.S_ISDIR(n.mode):
            return -errno.ENOTDIR
        v._run_core("check_access", path, os.R_OK)
        return _Dir(n, v)

    @guard
    def readdir(self, path, offset, dh=None):
        """Entries after `offset`, up to the end of one metadata page: libfuse calls again
        from the last offset it took until a call returns none (bounded memory)."""
        if dh is None:
            dh = _Dir(self.run("getattr", path, True), self.who())
        if len(self._listed) > 4096:
            self._listed.clear()
        self._listed[(dh.fs.user, path)] = (dh.ino, time.monotonic() + LISTED_AGE, _changes[0])
        out = []
        if offset < 1:
            out.append(fusepy.Direntry(".", offset=1, type=stat_mod.S_IFDIR, ino=dh.ino))
        if offset < 2:
            out.append(fusepy.Direntry("..", offset=2, type=stat_mod.S_IFDIR, ino=dh.parent))
        pos = max(offset, 2)
        if offset < 3 or (dh.page and pos < dh.page[0][0] - 1):  # (re)started: list from the top
            dh.reset()
        while True:
            out += [fusepy.Direntry(name, offset=off, type=typ, ino=ino)
                    for off, name, typ, ino in dh.page if off > pos]
            if out or dh.done:
                return out
            entries, cursor = dh.fs._run_core("readdir_page", dh.ino, dh.cursor, 0, False, path)
            page = []
            for e in entries:
                t = e.type << 12 if 0 < e.type < 16 else stat_mod.S_IFMT(e.type)
                page.append((dh.next_off, os.fsdecode(e.name), t, e.ino))
                dh.next_off += 1
            dh.page = page
            dh.cursor = cursor or b""
            dh.done = cursor is None

    def releasedir(self, path, dh=None):
        return 0

    # No fsyncdir: fuse-python 1.0.9 builds its call with a broken format string and
    # crashes. Without it the kernel gets ENOSYS once and then treats directory fsync
    # as done (directory changes are durable when each operation returns anyway).

    # ---- extended attributes --------------------------------------------------------------------------
    @guard
    def getxattr(self, path, name, size):
        if not name.startswith(_XATTR_OWN):
            return -errno.ENODATA  # security.*, system.* (ACLs): none; no RPC (asked on every write)
        value = self.run("getxattr", path, name, follow_symlinks=False)
        if size == 0:
            return len(value)
        if len(value) > size:
            return -errno.ERANGE
        text = _xattr_str(value)
        if text is None:
            log.warning("xattr %s of %s is not UTF-8: fuse-python cannot return it", name, path)
            return -errno.EOPNOTSUPP
        return text

    @guard
    def listxattr(self, path, size):
        names = self.run("listxattr", path, follow_symlinks=False)
        total = sum(len(os.fsencode(n)) + 1 for n in names)
        if size == 0:
            return total
        if total > size:
            return -errno.ERANGE
        return names

    @guard
    def setxattr(self, path, name, value, flags):
        if not name.startswith(_XATTR_OWN):
            return -errno.EOPNOTSUPP
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
        self.run("setxattr", path, name, raw, flags, follow_symlinks=False)
        return 0

    @guard
    def removexattr(self, path, name):
        if not name.startswith(_XATTR_OWN):
            return -errno.ENODATA
        self.run("removexattr", path, name, follow_symlinks=False)
        return 0


def _file_class(ops: FlyFuse):
    """The class fuse-python instantiates for open/create, bound to `ops`."""

    class FlyFile:
        """An open file: a client Handle (write session) used by every I/O call."""

        def __init__(self, path, flags, *mode):
            _changes[0] += 1
            if mode:
                _dir_changes[0] += 1
                seen = _dir_changes[0] + 1  # as it will be after this create, if nothing else ran
            try:
                self._open(path, flags, *mode)
            finally:
                _changes[0] += 1
                if mode:
                    _dir_changes[0] += 1
            if mode:
                ops._changed_in(path, self.h.dir_after, seen, self.fs.user)

        def _open(self, path, flags, *mode):
            try:
                self.fs = ops.who()
                if mode:
                    self.h = self.fs._run_core("open_handle", path, flags | os.O_CREAT, mode[0], umask=0)
                else:
                    self.h = self.fs._run_core("open_handle", path, flags)
            except OSError as e:
                raise OSError(_errno(e), os.strerror(_errno(e)), path) from None
            except Exception as e:
                log.exception("open %r failed", path)
                raise OSError(_errno(e), os.strerror(_errno(e)), path) from None
            self.core = self.fs.core
            self.ra = self.fs.readahead(self.h)
            # fuse-python sets the open's FOPEN_KEEP_CACHE from this: the kernel keeps the
            # file's cached pages only while nobody else changed it (exact times and size;
            # libfuse's auto_cache compares whole-second mtimes, so it kept same-size rewrites).
            self.keep_cache = self.core.unchanged_since_seen(self.h)

        def _run(self, name, *args):
            return self.fs._run_core(name, *args)

        @guard
        def read(self, size, offset):
            if self.ra is not None:
                data = self.ra.read(offset, size)
                if data is not None:
                    return data
            buf = bytearray(size)
            n = self.core.pread_direct(self.h, buf, offset)
            if n is None:
                n = self._run("pread_into", self.h, buf, offset)
            # a slice, not `del buf[n:]`: a view the storage client took may still be alive
            return bytes(buf) if n == size else bytes(memoryview(buf)[:n])

        @guard
        def write(self, buf, offset):
            if self.core.write_buffered(self.h, buf, offset):
                return len(buf)
            return self._run("write_behind", self.h, buf, offset)

        @guard
        def flush(self):
            if self.core.flush_needed(self.h) and not (self.core.flush_direct(self.h)
                                                       and not self.core.flush_needed(self.h)):
                self._run("flush", self.h)
            return 0

        @guard
        def fsync(self, isfsyncfile):
            self._run("fsync", self.h)
            return 0

        @guard
        def release(self, flags):
            if self.ra is not None:
                self.ra.clear()
            if self.core.close_needs_nothing(self.h):
                self.fs._close_soon(self.h)   # the kernel does not wait for a release either
            else:
                self._run("close_handle", self.h)
            return 0

        @guard
        def fgetattr(self):
            n = self.core.fgetattr_cached(self.h, ATTR_AGE)
            return fuse_stat(n if n is not None else self._run("fgetattr", self.h, ATTR_AGE))

        @guard
        def ftruncate(self, length):
            self._run("truncate", self.h, length)
            return 0

    return FlyFile
