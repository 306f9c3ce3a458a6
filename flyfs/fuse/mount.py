"""`flyfs mount` and `flyfs umount`.

    flyfs mount --cluster 127.0.0.1:8000 /mnt/flyfs            # returns once mounted
    flyfs mount --cluster 127.0.0.1:8000 /mnt/flyfs -f         # stay in the foreground
    flyfs mount --cluster 127.0.0.1:8000 /mnt/flyfs -o ro,attr_timeout=5
    flyfs umount /mnt/flyfs

Without -f the command starts the daemon (`flyfs mount ... -f` in a new
session, so it is a fresh process whatever the caller runs) and waits until
the kernel has the mount, so a bad address or mount point is an error of
this command, not of a lost background process. The daemon unmounts on
SIGTERM/SIGINT (libfuse's handlers).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

log = logging.getLogger("flyfs.fuse")

__all__ = ["main", "umount_main", "fuse_options", "is_mounted", "unmount", "DEFAULT_OPTIONS"]

# max_write: fuse-python/libfuse 2 caps requests at 128 KiB. No auto_cache: flyfs
# decides at each open whether the kernel keeps the file's cached pages (FlyFile:
# exact mtime, ctime and size; auto_cache compares mtimes in whole seconds). allow_other +
# default_permissions: every user may use the mount, the kernel checks mode bits
# and the metadata service checks them again with the caller's uid and groups.
DEFAULT_OPTIONS = {
    "fsname": "flyfs", "subtype": "flyfs", "default_permissions": None, "allow_other": None,
    "use_ino": None, "big_writes": None, "max_write": "131072", "max_read": "131072",
    "attr_timeout": "1", "entry_timeout": "1", "negative_timeout": "0",
}


def fuse_options(extra: list[str] | None, cluster: str) -> str:
    """The -o string: defaults, then the user's options (which win; 'noX' drops default X)."""
    opts: dict[str, str | None] = dict(DEFAULT_OPTIONS)
    opts["fsname"] = f"flyfs#{cluster}"
    if os.geteuid() != 0:
        del opts["allow_other"]  # needs root (or user_allow_other in /etc/fuse.conf): ask with -o
    for group in extra or []:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep and key.startswith("no") and key[2:] in opts and opts[key[2:]] is None:
                del opts[key[2:]]
                continue
            opts[key] = value if sep else None
    return ",".join(k if v is None else f"{k}={v}" for k, v in opts.items())


def is_mounted(mountpoint: str) -> bool:
    """Whether a flyfs (FUSE) file system is mounted at `mountpoint`."""
    mp = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                point = parts[4].replace("\\040", " ")
                if point == mp and parts[sep + 1].startswith("fuse"):
                    return True
    except (OSError, ValueError):
        pass
    return False


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="flyfs mount", description="Mount a flyfs cluster with FUSE (multithreaded; run as root "
        "for other users to see it).",
        epilog="example: flyfs mount --cluster 127.0.0.1:8000 /mnt/flyfs")
    p.add_argument("--cluster", required=True, help="mgmtd address HOST:PORT (or flyfs://HOST:PORT)")
    p.add_argument("--meta", default=None, help="metadata server HOST:PORT (default: from mgmtd)")
    p.add_argument("mountpoint", help="an existing empty directory")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="FUSE mount options, comma-separated (e.g. ro,attr_timeout=5); repeatable")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the mount (daemon mode)")
    p.add_argument("--connect-timeout", type=float, default=15.0, help="seconds to keep trying to reach mgmtd")
    p.add_argument("--log-file", default=None, help="daemon log (default: none; foreground: stderr)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("-d", "--debug", action="store_true", help="libfuse debug output (implies -f)")
    return p.parse_args(argv)


class XattrNoiseFilter:
    """sys.stderr for the FUSE loop. fuse-python decodes an xattr value as UTF-8 before
    our setxattr sees it; a binary one (cp -a and rsync -A set system.posix_acl_access,
    an ACL, on every file) fails there with EINVAL and Python prints the decode error
    to stderr each time. The first is logged with what it means, the rest dropped;
    every other line passes through (Python prints an error in pieces: lines are
    assembled before they are judged)."""

    NOISE = "UnicodeDecodeError: 'utf-8' codec can't decode"

    def __init__(self, stream):
        self._stream = stream
        self._told = False
        self._partial = ""
        self._mu = threading.Lock()

    def write(self, text: str) -> int:
        with self._mu:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                if not line.startswith(self.NOISE):
                    self._stream.write(line + "\n")
                elif not self._told:
                    self._told = True
                    log.warning("an extended attribute whose value is not UTF-8 was refused with EINVAL "
                                "(fuse-python passes values as text; flyfs has no POSIX ACLs): %s "
                                "(logged once)", line)
        return len(text)

    def flush(self) -> None:
        with self._mu:
            if self._partial:
                self._stream.write(self._partial)
                self._partial = ""
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _serve(args, options: str) -> int:
    """Connect and run the FUSE loop until unmounted (in this process)."""
    from ..client import connect
    from .ops import FlyFuse, set_mount_options

    try:
        fs = connect(args.cluster, meta=args.meta, connect_timeout=args.connect_timeout)
        fs.statvfs("/")
    except Exception as e:
        print(f"flyfs mount: cannot reach the cluster at {args.cluster}: {e}", file=sys.stderr)
        return 1
    set_mount_options(options)
    fargs = ["flyfs", args.mountpoint, "-f", "-o", options]
    if args.debug:
        fargs.append("-d")
    server = FlyFuse(fs)
    sys.stderr = XattrNoiseFilter(sys.stderr)
    try:
        server.main(fargs)
    except Exception as e:  # fuse.FuseError: the mount itself failed
        print(f"flyfs mount: mounting {args.mountpoint} failed: {e}", file=sys.stderr)
        return 1
    finally:
        try:
            fs.close()
        except Exception as e:
            log.warning("closing the client: %s", e)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv_list)
    mp = args.mountpoint
    if not os.path.isdir(mp):
        print(f"flyfs mount: mount point {mp!r} is not a directory", file=sys.stderr)
        return 2
    if is_mounted(mp):
        print(f"flyfs mount: something is already mounted at {mp}", file=sys.stderr)
        return 1
    from ..client.fs import parse_address
    try:
        parse_address(args.cluster)
    except ValueError as e:
        print(f"flyfs mount: {e}", file=sys.stderr)
        return 2
    options = fuse_options(args.options, args.cluster)
    if not (args.foreground or args.debug):
        return _daemonize(args, argv_list)
    level = getattr(logging, args.log_level.upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return _serve(args, options)


def _daemonize(args, argv: list[str]) -> int:
    """Start `flyfs mount ... -f` as a detached process (a fresh interpreter, whatever
    this process runs) and wait until the kernel has the mount or it exits."""
    import tempfile
    if args.log_file:
        log_path, keep = args.log_file, True
    else:
        fd, log_path = tempfile.mkstemp(prefix="flyfs-mount-", suffix=".log")
        os.close(fd)
        keep = False
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flyfs.cli", "mount", *argv, "-f"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while not is_mounted(args.mountpoint):
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-2000:].strip()
            if not keep:
                os.unlink(log_path)
            print(tail or f"flyfs mount: the mount daemon exited with status {proc.returncode}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(f"flyfs mount: not mounted after {args.timeout:g} s (daemon pid {proc.pid} left running; "
                  f"log {log_path})", file=sys.stderr)
            return 1
        time.sleep(0.02)
    if not keep:
        os.unlink(log_path)  # the daemon keeps writing to it, unnamed
    print(f"flyfs mounted at {args.mountpoint} (daemon pid {proc.pid})")
    return 0


def unmount(mountpoint: str, lazy_fallback: bool = True) -> tuple[bool, str]:
    """Unmount with fusermount3 -u (or fusermount -u), falling back to umount -l; (ok, message)."""
    errors = []
    for cmd in (["fusermount3", "-u", mountpoint], ["fusermount", "-u", mountpoint]):
        if shutil.which(cmd[0]) is None:
            continue
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return True, ""
        errors.append(f"{cmd[0]}: {r.stderr.strip() or r.returncode}")
    if lazy_fallback:
        r = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True)
        if r.returncode == 0:
            return True, "unmounted lazily (umount -l): it was busy"
        errors.append(f"umount -l: {r.stderr.strip() or r.returncode}")
    return False, "; ".join(errors)


def umount_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flyfs umount", description="Unmount a flyfs FUSE mount.",
                                epilog="example: flyfs umount /mnt/flyfs")
    p.add_argument("mountpoint")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not is_mounted(args.mountpoint):
        print(f"flyfs umount: nothing is mounted at {args.mountpoint}", file=sys.stderr)
        return 1
    ok, msg = unmount(args.mountpoint)
    if not ok:
        print(f"flyfs umount: {args.mountpoint}: {msg}", file=sys.stderr)
        return 1
    if msg:
        print(f"flyfs umount: {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
