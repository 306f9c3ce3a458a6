#!/usr/bin/env python3
"""`flyfs mount -f` with every FUSE operation counted and timed.

    scripts/fuse_trace.py --cluster HOST:PORT MOUNTPOINT [-o OPTIONS]   # foreground
    ... run a workload on MOUNTPOINT, then: fusermount3 -u MOUNTPOINT

On exit it prints, per operation, how many times the kernel asked and the
mean time spent answering (in this process), e.g. what one `open(O_CREAT)`
and `close(2)` cost through the mount. A diagnostic for BENCHMARKS.md.
"""
import atexit
import collections
import functools
import sys
import threading
import time

from flyfs.fuse import ops

_counts: collections.Counter = collections.Counter()
_secs: collections.Counter = collections.Counter()
_mu = threading.Lock()


def _timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            with _mu:
                _counts[name] += 1
                _secs[name] += time.perf_counter() - t
    return wrapper


def _report() -> None:
    for name, n in _counts.most_common():
        print(f"{name:12s} {n:8d} {_secs[name] / n * 1e6:9.0f} us", file=sys.stderr)


def main() -> int:
    for name in ("getattr", "access", "readlink", "opendir", "readdir", "releasedir", "mknod", "mkdir",
                 "unlink", "rmdir", "symlink", "rename", "link", "chmod", "chown", "truncate", "utimens",
                 "statfs", "getxattr", "listxattr", "setxattr", "removexattr"):
        if hasattr(ops.FlyFuse, name):
            setattr(ops.FlyFuse, name, _timed(name, getattr(ops.FlyFuse, name)))
    file_class = ops._file_class

    def timed_file_class(o):
        cls = file_class(o)
        cls.__init__ = _timed("open/create", cls.__init__)
        for name in ("read", "write", "flush", "fsync", "release", "fgetattr", "ftruncate"):
            setattr(cls, name, _timed(name, getattr(cls, name)))
        return cls

    ops._file_class = timed_file_class
    atexit.register(_report)
    from flyfs.fuse.mount import main as mount_main
    argv = sys.argv[1:]
    return mount_main(argv if "-f" in argv else argv + ["-f"])


if __name__ == "__main__":
    sys.exit(main())
