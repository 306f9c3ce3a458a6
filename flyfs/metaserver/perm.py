"""Who is asking, and what POSIX lets them do (pure functions, no I/O).

The rules follow Linux: owner/group/other mode bits; root (uid 0) bypasses
read/write checks and search on directories, and may execute a file only if
some execute bit is set; sticky directories restrict removal and renaming to
the owner of the entry, the owner of the directory or root; setgid
directories pass their group (and, to subdirectories, the setgid bit) on.
"""
from __future__ import annotations

import errno
import stat
from dataclasses import dataclass

from .errors import fail, type_name
from .schema import Inode

R_OK, W_OK, X_OK = 4, 2, 1
OVERFLOW_GID = 65534


@dataclass(frozen=True)
class Caller:
    """The user behind a request (RequestHeader): uid, groups, client and request ids.

    ``gids[0]`` is the primary group: new inodes get it unless a setgid
    directory decides otherwise. An empty list means group 0 for root and the
    overflow group (65534) for anyone else.
    """

    uid: int = 0
    gids: tuple[int, ...] = ()
    client_id: str = ""
    request_uuid: bytes = b""

    @property
    def gid(self) -> int:
        if self.gids:
            return self.gids[0]
        return 0 if self.uid == 0 else OVERFLOW_GID

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.gids

    def with_uuid(self, uuid: bytes) -> "Caller":
        return Caller(self.uid, self.gids, self.client_id, uuid)


ROOT = Caller(0, (0,))


def allowed(node: Inode, who: Caller, mask: int) -> bool:
    """Whether `who` may access `node` for `mask` (R_OK|W_OK|X_OK bits)."""
    mode = node.mode
    if who.uid == 0:
        if mask & X_OK and not stat.S_ISDIR(mode) and not mode & 0o111:
            return False
        return True
    if who.uid == node.uid:
        bits = (mode >> 6) & 7
    elif who.in_group(node.gid):
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & mask == mask


def check_access(node: Inode, who: Caller, mask: int, what: str = "") -> None:
    if not allowed(node, who, mask):
        need = "".join(c for c, b in (("r", R_OK), ("w", W_OK), ("x", X_OK)) if mask & b)
        raise fail(errno.EACCES, f"permission denied: uid {who.uid} lacks '{need}' on "
                                 f"{type_name(node.mode)} {node.ino}{' (' + what + ')' if what else ''}")


def check_search(dir_node: Inode, who: Caller) -> None:
    """Search (x) permission on a directory being walked through."""
    if not stat.S_ISDIR(dir_node.mode):
        raise fail(errno.ENOTDIR, f"inode {dir_node.ino} is not a directory")
    check_access(dir_node, who, X_OK, "search")


def check_dir_write(dir_node: Inode, who: Caller) -> None:
    """Adding or removing entries: write and search permission on the directory."""
    if not stat.S_ISDIR(dir_node.mode):
        raise fail(errno.ENOTDIR, f"inode {dir_node.ino} is not a directory")
    check_access(dir_node, who, W_OK | X_OK, "modify directory")


def is_owner(node: Inode, who: Caller) -> bool:
    return who.uid == 0 or who.uid == node.uid


def check_owner(node: Inode, who: Caller, what: str) -> None:
    if not is_owner(node, who):
        raise fail(errno.EPERM, f"operation not permitted: only the owner (uid {node.uid}) or root may {what}")


def check_sticky(dir_node: Inode, victim: Inode, who: Caller) -> None:
    """In a sticky directory only the entry's owner, the directory's owner or root may remove/rename it."""
    if dir_node.mode & stat.S_ISVTX and who.uid not in (0, victim.uid, dir_node.uid):
        raise fail(errno.EPERM, f"operation not permitted: directory {dir_node.ino} is sticky and "
                                f"uid {who.uid} owns neither it nor inode {victim.ino}")


def new_owner(parent: Inode, who: Caller, mode: int) -> tuple[int, int, int]:
    """(uid, gid, mode) of a new inode created by `who` in `parent` with `mode` (type bits included).

    A setgid parent gives its group, and the setgid bit to new directories.
    A non-directory asking for setgid in a group its creator is not in loses
    the bit (as Linux's inode_init_owner does).
    """
    gid = who.gid
    if parent.mode & stat.S_ISGID:
        gid = parent.gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    if (mode & stat.S_ISGID and not stat.S_ISDIR(mode) and who.uid != 0
            and not who.in_group(gid)):
        mode &= ~stat.S_ISGID
    return who.uid, gid, mode


def kill_suid(mode: int) -> int:
    """Mode after a write/truncate/chown: setuid goes; setgid goes when group-exec is set
    (without group-exec it marks mandatory locking and stays)."""
    if stat.S_ISDIR(mode):
        return mode
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode
