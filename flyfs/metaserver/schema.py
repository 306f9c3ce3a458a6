"""Key schema and value encodings of the metadata service — written down once, here.

Every key starts with ``M`` (the metadata namespace) and a one-letter tag.
Inode ids are 8-byte little-endian unsigned integers, so consecutive ids
spread across a range-partitioned KV while all entries of one directory
still sit together (the parent id is a fixed prefix).

    key                                    value
    -------------------------------------  ----------------------------------------------
    MI <ino:u64le>                         inode attributes (INODE struct below)
    MD <parent:u64le> <name>               directory entry: <ino:u64le> <type:u8>
                                           (type = S_IFMT >> 12, the DT_* value)
    MT <dir:u64le>                         directory time stamp <mtime:i64 s, u32 ns>
                                           <ctime:i64 s, u32 ns>, written blindly by
                                           entry changes (see below)
    MS <ino:u64le> <session:16 bytes>      write session: <opened:i64 ns> <deadline:i64 ns>
                                           <client_id: utf-8, rest of the value>
    MC <name: ascii>                       counter / singleton:
                                             MCnext_ino  <u64le> next unreserved inode id
                                             MCdirmove   <u64le> bumped by every directory
                                                         move across parents
                                             MCformat    <u32le> schema version
    MG <ino:u64le>                         GC queue: <queued:i64 ns>; the inode (nlink 0)
                                           stays until its chunks are removed
    MR <uuid: 1..64 bytes>                 idempotency record: <done:i64 ns> <op:u8> <result>
    ME <done:u64be ns> <uuid>              expiry index of MR records (big-endian time so a
                                           range read finds the old ones)
    MX <ino:u64le> <name>                  extended attribute value
    MF <ino:u64le>                         a small file's data held here instead of in
                                           chunks: <spill:i64 ns> <data> (see INLINE)

All integers are little-endian (struct ``<``) except the ME time, which is
big-endian so keys sort by time. Times are signed 64-bit seconds plus
unsigned 32-bit nanoseconds (full 64-bit second range); in Python they are
plain ints of nanoseconds.

INODE struct (version 1), ``<BIIIIQqIqIqIQQIIIIH`` then variable parts:

    u8 version, u32 mode (st_mode with type), u32 uid, u32 gid, u32 nlink,
    u64 size, atime (i64 s, u32 ns), mtime (i64 s, u32 ns), ctime (i64 s, u32 ns),
    u64 rdev, u64 parent (directories: the parent directory; others 0),
    u32 chunk_size, u32 stripe, u32 chain_table_version, u32 seed, u16 nchains,
    nchains x u32 chain id, then the symlink target (rest of the value).

INLINE: a regular file created while the server's ``inline_max`` is set gets
an MF key (empty data). While the key exists the file's bytes are its data
followed by zeros up to the inode's size, and no chunk of it is authoritative;
writes that end within ``inline_max`` change the data in the transaction that
stamps mtime and the length (flyfs/metaserver/inline.py). A write beyond it
first moves the data to chunk 0 ("spill", by a metadata server: it takes the
spill lease, writes the data to storage, then deletes the key if the data did
not change meanwhile). ``spill`` is 0 while no spill ever started (no chunk can
exist: GC frees the inode with no call to storage), else the end of the current spiller's
lease. A file never becomes inline again once spilled.

Directories keep their layout (chunk size, stripe) for new children; files
record the chains they were given at create time (``Layout.chain_of``).

Hot directories: creating or removing an entry reads the parent inode
(permission, existence) but does not write it; the parent's new mtime/ctime
goes to its MT stamp with a blind write, which adds no read conflict, so
creates in one directory never conflict with each other. While an MT stamp
exists its times override the inode's; any write of a directory inode folds
the times in and clears the stamp. Only changes of a directory's own
attributes or link count (mkdir/rmdir/moving directories) write the inode.
"""
from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field, replace

ROOT_INO = 1
FORMAT_VERSION = 1
NS = 1_000_000_000

P_INODE = b"MI"
P_DENTRY = b"MD"
P_STAMP = b"MT"
P_SESSION = b"MS"
P_COUNTER = b"MC"
P_GC = b"MG"
P_IDEM = b"MR"
P_IDEM_EXPIRY = b"ME"
P_XATTR = b"MX"
P_INLINE = b"MF"

K_NEXT_INO = P_COUNTER + b"next_ino"
K_DIRMOVE = P_COUNTER + b"dirmove"
K_FORMAT = P_COUNTER + b"format"

SESSION_ID_LEN = 16
MAX_UUID_LEN = 64

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_DENTRY = struct.Struct("<QB")
_STAMP = struct.Struct("<qIqI")
_SESSION = struct.Struct("<qq")
_IDEM = struct.Struct("<qB")
_INODE = struct.Struct("<BIIIIQqIqIqIQQIIIIH")

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def prefix_end(prefix: bytes) -> bytes:
    """Smallest key greater than every key starting with `prefix`."""
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:
        b.pop()
    b[-1] += 1
    return bytes(b)


def u64(n: int) -> bytes:
    return _U64.pack(n)


def read_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


# ---- keys ---------------------------------------------------------------------

def inode_key(ino: int) -> bytes:
    return P_INODE + _U64.pack(ino)


def dentry_key(parent: int, name: bytes) -> bytes:
    return P_DENTRY + _U64.pack(parent) + name


def dentry_range(parent: int) -> tuple[bytes, bytes]:
    """[begin, end) of every entry of directory `parent`."""
    p = P_DENTRY + _U64.pack(parent)
    return p, prefix_end(p)


def stamp_key(ino: int) -> bytes:
    return P_STAMP + _U64.pack(ino)


def session_key(ino: int, session: bytes) -> bytes:
    return P_SESSION + _U64.pack(ino) + session


def session_range(ino: int | None = None) -> tuple[bytes, bytes]:
    p = P_SESSION if ino is None else P_SESSION + _U64.pack(ino)
    return p, prefix_end(p)


def gc_key(ino: int) -> bytes:
    return P_GC + _U64.pack(ino)


def idem_key(uuid: bytes) -> bytes:
    return P_IDEM + uuid


def idem_expiry_key(done_ns: int, uuid: bytes) -> bytes:
    return P_IDEM_EXPIRY + struct.pack(">Q", max(done_ns, 0)) + uuid


def xattr_key(ino: int, name: bytes) -> bytes:
    return P_XATTR + _U64.pack(ino) + name


def inline_key(ino: int) -> bytes:
    return P_INLINE + _U64.pack(ino)


def encode_inline(spill: int, data: bytes) -> bytes:
    return _I64.pack(spill) + data


def decode_inline(raw: bytes) -> tuple[int, bytes]:
    """(spill, data) of an MF value: spill 0 = never spilled, else a spill lease's end (ns)."""
    return _I64.unpack_from(raw)[0], bytes(raw[8:])


def xattr_range(ino: int) -> tuple[bytes, bytes]:
    p = P_XATTR + _U64.pack(ino)
    return p, prefix_end(p)


def ino_of(key: bytes, prefix_len: int = 2) -> int:
    """The inode id that follows a 2-byte prefix in `key`."""
    return _U64.unpack_from(key, prefix_len)[0]


# ---- values -------------------------------------------------------------------

def split_ns(t: int) -> tuple[int, int]:
    sec, nsec = divmod(t, NS)
    return sec, nsec


def join_ns(sec: int, nsec: int) -> int:
    return sec * NS + nsec


@dataclass(frozen=True)
class Layout:
    """Where a file's chunks live: chunk i is on ``chains[(seed + i) % stripe]``.

    Directories carry only chunk_size and stripe (inherited by new children);
    a file also records the chain table version and the `stripe` chain ids it
    was given at create time.
    """

    chunk_size: int
    stripe: int
    chain_table_version: int = 0
    seed: int = 0
    chains: tuple[int, ...] = ()

    def chain_of(self, chunk_index: int) -> int:
        if not self.chains:
            raise ValueError("this layout has no chains (a directory layout, or no storage)")
        return self.chains[(self.seed + chunk_index) % len(self.chains)]


@dataclass(frozen=True)
class Inode:
    """Attributes of one inode. Times are ints of nanoseconds since the epoch."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime: int
    mtime: int
    ctime: int
    rdev: int = 0
    parent: int = 0
    layout: Layout = field(default_factory=lambda: Layout(0, 0))
    target: bytes = b""

    @property
    def type(self) -> int:
        """The S_IFMT bits."""
        return stat.S_IFMT(self.mode)

    @property
    def perm(self) -> int:
        return self.mode & 0o7777

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def blocks(self) -> int:
        """512-byte blocks, as st_blocks reports them."""
        return (self.size + 511) // 512

    def with_(self, **kw) -> "Inode":
        return replace(self, **kw)


@dataclass(frozen=True)
class DirEntry:
    """One readdir entry; `attr` is filled by readdir(plus=True)."""

    name: bytes
    ino: int
    type: int  # S_IFMT bits of the entry
    attr: Inode | None = None


@dataclass(frozen=True)
class StatFs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


def encode_inode(n: Inode) -> bytes:
    a_s, a_n = split_ns(n.atime)
    m_s, m_n = split_ns(n.mtime)
    c_s, c_n = split_ns(n.ctime)
    lay = n.layout
    head = _INODE.pack(FORMAT_VERSION, n.mode, n.uid, n.gid, n.nlink, n.size,
                       a_s, a_n, m_s, m_n, c_s, c_n, n.rdev, n.parent,
                       lay.chunk_size, lay.stripe, lay.chain_table_version, lay.seed, len(lay.chains))
    if lay.chains:
        head += struct.pack(f"<{len(lay.chains)}I", *lay.chains)
    return head + n.target


def decode_inode(ino: int, b: bytes) -> Inode:
    (ver, mode, uid, gid, nlink, size, a_s, a_n, m_s, m_n, c_s, c_n, rdev, parent,
     chunk, stripe, ctv, seed, nchains) = _INODE.unpack_from(b)
    if ver != FORMAT_VERSION:
        raise ValueError(f"inode {ino}: unknown inode format version {ver}")
    off = _INODE.size
    chains = struct.unpack_from(f"<{nchains}I", b, off) if nchains else ()
    off += 4 * nchains
    return Inode(ino, mode, uid, gid, nlink, size, join_ns(a_s, a_n), join_ns(m_s, m_n),
                 join_ns(c_s, c_n), rdev, parent, Layout(chunk, stripe, ctv, seed, tuple(chains)),
                 bytes(b[off:]))


def encode_dentry(ino: int, type_bits: int) -> bytes:
    return _DENTRY.pack(ino, type_bits >> 12)


def decode_dentry(b: bytes) -> tuple[int, int]:
    """(ino, S_IFMT bits)."""
    ino, t = _DENTRY.unpack(b)
    return ino, t << 12


def encode_stamp(mtime: int, ctime: int) -> bytes:
    return _STAMP.pack(*split_ns(mtime), *split_ns(ctime))


def decode_stamp(b: bytes) -> tuple[int, int]:
    m_s, m_n, c_s, c_n = _STAMP.unpack(b)
    return join_ns(m_s, m_n), join_ns(c_s, c_n)


def apply_stamp(n: Inode, stamp: bytes | None) -> Inode:
    """A directory's effective times: its MT stamp, when present, overrides the inode's."""
    if stamp is None:
        return n
    m, c = decode_stamp(stamp)
    return replace(n, mtime=m, ctime=c)


@dataclass(frozen=True)
class Session:
    ino: int
    session: bytes
    opened: int
    deadline: int
    client_id: str


def encode_session(opened: int, deadline: int, client_id: str) -> bytes:
    return _SESSION.pack(opened, deadline) + client_id.encode()


def decode_session(key: bytes, value: bytes) -> Session:
    ino = ino_of(key)
    opened, deadline = _SESSION.unpack_from(value)
    return Session(ino, bytes(key[10:]), opened, deadline, bytes(value[_SESSION.size:]).decode(errors="replace"))


def encode_idem(done: int, op: int, result: bytes = b"") -> bytes:
    return _IDEM.pack(done, op) + result


def decode_idem(b: bytes) -> tuple[int, int, bytes]:
    done, op = _IDEM.unpack_from(b)
    return done, op, bytes(b[_IDEM.size:])


def encode_u64(n: int) -> bytes:
    return _U64.pack(n)


def encode_i64(n: int) -> bytes:
    return _I64.pack(n)


def decode_i64(b: bytes) -> int:
    return _I64.unpack(b)[0]


def encode_u32(n: int) -> bytes:
    return _U32.pack(n)


def decode_u32(b: bytes) -> int:
    return _U32.unpack(b)[0]
