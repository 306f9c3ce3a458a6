"""Small command-line tools over the client: `flyfs set-layout`, `flyfs stat`, `flyfs ls`.

Each takes the cluster (the manager's HOST:PORT) first, then a path inside flyfs.
"""
from __future__ import annotations

import argparse
import stat as statmod
import sys
import time

from . import connect


def _size(text: str) -> int:
    from ..cluster.launcher import parse_size
    return parse_size(text)


def _run(prog: str, fn, argv, build) -> int:
    ap = argparse.ArgumentParser(prog=f"flyfs {prog}", description=fn.__doc__.splitlines()[0],
                                 epilog=build.__doc__)
    ap.add_argument("--cluster", required=True, help="the manager's HOST:PORT")
    build(ap)
    args = ap.parse_args(argv)
    try:
        fs = connect(args.cluster)
    except OSError as e:
        print(f"flyfs {prog}: cannot connect to {args.cluster}: {e}", file=sys.stderr)
        return 1
    try:
        return fn(fs, args) or 0
    except OSError as e:
        print(f"flyfs {prog}: {e}", file=sys.stderr)
        return 1
    finally:
        fs.close()


def set_layout(fs, args) -> int:
    """Set the chunk size and stripe width of a directory (inherited by what is created in it)."""
    from ..metaserver.layout import check_layout
    check_layout(args.chunk_size, args.stripe)  # the server checks too; this names what is wrong
    fs.set_layout(args.path, args.chunk_size, args.stripe)
    print(f"{args.path}: chunk size {args.chunk_size}, stripe {args.stripe}")


def _set_layout_args(ap):
    """example: flyfs set-layout --cluster 127.0.0.1:8000 /datasets --chunk-size 1MiB --stripe 4"""
    ap.add_argument("path")
    ap.add_argument("--chunk-size", type=_size, required=True, help="power of two, 4KiB..1GiB")
    ap.add_argument("--stripe", type=int, required=True, help="number of chains a file spreads over")


def show_stat(fs, args) -> int:
    """Show a file's attributes as flyfs stores them."""
    st = fs.stat(args.path, follow_symlinks=False)
    kind = statmod.filemode(st.st_mode)
    print(f"  path: {args.path}\n  type/mode: {kind} ({oct(statmod.S_IMODE(st.st_mode))})\n"
          f"  inode: {st.st_ino}  links: {st.st_nlink}  uid: {st.st_uid}  gid: {st.st_gid}\n"
          f"  size: {st.st_size}  blksize: {st.st_blksize}\n"
          f"  mtime: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.st_mtime))}"
          f".{st.st_mtime_ns % 10**9:09d}")


def _path_arg(ap):
    """example: flyfs stat --cluster 127.0.0.1:8000 /data/a/x.bin"""
    ap.add_argument("path")


def list_dir(fs, args) -> int:
    """List a directory."""
    for entry in sorted(fs.scandir(args.path), key=lambda e: e.name):
        if args.long:
            st = entry.stat(follow_symlinks=False)
            print(f"{statmod.filemode(st.st_mode)} {st.st_nlink:>3} {st.st_uid:>5} {st.st_gid:>5} "
                  f"{st.st_size:>12} {entry.name}")
        else:
            print(entry.name)


def _ls_args(ap):
    """example: flyfs ls --cluster 127.0.0.1:8000 -l /data"""
    ap.add_argument("path", nargs="?", default="/")
    ap.add_argument("-l", "--long", action="store_true")


def set_layout_main(argv):
    return _run("set-layout", set_layout, argv, _set_layout_args)


def stat_main(argv):
    return _run("stat", show_stat, argv, _path_arg)


def ls_main(argv):
    return _run("ls", list_dir, argv, _ls_args)
