"""The client API (FileSystem, AsyncFileSystem, io objects) on a real cluster:
mgmtd, 3 storage nodes (3 chains of 2), a metadata server; 64 KiB chunks."""
from __future__ import annotations

import errno
import io
import os
import pickle
import stat
import threading
import time
import uuid

import pytest

from flyfs.client import AsyncFileSystem, ClientConfig
from test_client_cluster import CHUNK, fly, fs  # noqa: F401 (fixtures)

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 10 * CHUNK]


@pytest.fixture
def d(fs):
    """A fresh directory per test."""
    path = "/c-" + uuid.uuid4().hex[:10]
    fs.mkdir(path)
    return path


def data_of(n: int, seed: int = 0) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[seed % 256:][:n] if n < 4096 else os.urandom(n)


# ---- data ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_round_trip_across_chunk_boundaries(fs, d, size):
    payload = data_of(size)
    p = f"{d}/f{size}"
    assert fs.write_bytes(p, payload) == size
    assert fs.read_bytes(p) == payload
    assert fs.stat(p).st_size == size
    with fs.open(p, "rb") as f:
        assert f.read() == payload


def test_small_writes_through_a_buffered_file(fs, d):
    payload = os.urandom(5 * CHUNK + 333)
    p = f"{d}/small"
    with fs.open(p, "wb") as f:
        for i in range(0, len(payload), 4096):
            f.write(payload[i:i + 4096])
    assert fs.read_bytes(p) == payload


def test_pread_pwrite_holes_and_eof(fs, d):
    p = f"{d}/sparse"
    fs.write_bytes(p, b"")
    assert fs.pwrite(p, b"A" * 100, 2 * CHUNK - 50) == 100   # straddles chunks 1 and 2
    assert fs.stat(p).st_size == 2 * CHUNK + 50
    buf = bytearray(2 * CHUNK + 50)
    assert fs.pread(p, buf, 0) == 2 * CHUNK + 50
    assert buf == bytes(2 * CHUNK - 50) + b"A" * 100        # the hole reads as zeros
    tail = bytearray(500)
    assert fs.pread(p, tail, 2 * CHUNK) == 50                 # short at end of file
    assert tail[:50] == b"A" * 50
    assert fs.pread(p, bytearray(10), 10 * CHUNK) == 0       # past the end
    mv = memoryview(bytearray(300))
    assert fs.pread(p, mv[100:200], 2 * CHUNK - 60) == 100    # into a slice of a buffer
    assert bytes(mv[100:200]) == bytes(10) + b"A" * 90


def test_pread_pwrite_on_open_files(fs, d):
    p = f"{d}/rw"
    with fs.open(p, "w+b") as f:
        f.write(b"x" * 10)                       # still in the io buffer
        assert fs.pwrite(f, b"HELLO", 3 * CHUNK) == 5   # flushes the buffer first
        buf = bytearray(5)
        assert fs.pread(f, buf, 3 * CHUNK) == 5 and buf == b"HELLO"
        assert fs.pread(f, bytearray(10), 0) == 10
    data = fs.read_bytes(p)
    assert data[:10] == b"x" * 10 and data[-5:] == b"HELLO" and len(data) == 3 * CHUNK + 5


def test_batch_read(fs, d):
    files = {f"{d}/b{i}": os.urandom(CHUNK * i + 1000) for i in range(1, 5)}
    for p, data in files.items():
        fs.write_bytes(p, data)
    reqs, want = [], []
    for p, data in files.items():
        for off, ln in ((0, 100), (CHUNK - 10, 40), (len(data) - 30, 100)):
            reqs.append((p, off, ln, bytearray(ln)))
            want.append(data[off:off + ln])
    with fs.open(f"{d}/b4", "rb") as f:                  # open files and paths mixed
        reqs.append((f, 5, 2 * CHUNK, bytearray(2 * CHUNK)))
        want.append(files[f"{d}/b4"][5:5 + 2 * CHUNK])
        counts = fs.batch_read(reqs)
    assert counts == [len(w) for w in want]
    for (_, _, _, buf), w, n in zip(reqs, want, counts):
        assert bytes(buf[:n]) == w
    # buffer None: the bytes come back instead of a count
    assert fs.batch_read([(f"{d}/b1", 1, 3, None)]) == [files[f"{d}/b1"][1:4]]


def test_io_objects_seek_tell_readinto(fs, d):
    p = f"{d}/io"
    payload = os.urandom(3 * CHUNK)
    fs.write_bytes(p, payload)
    with fs.open(p, "rb") as f:
        assert isinstance(f, io.BufferedReader) and f.readable() and not f.writable() and f.seekable()
        assert f.seek(CHUNK - 3) == CHUNK - 3 and f.tell() == CHUNK - 3
        buf = bytearray(10)
        assert f.readinto(buf) == 10 and buf == payload[CHUNK - 3:CHUNK + 7]
        assert f.seek(-4, io.SEEK_END) == len(payload) - 4
        assert f.read() == payload[-4:]
        assert f.read() == b""
        f.seek(5)
        assert f.seek(10, io.SEEK_CUR) == 15
        assert f.read(3) == payload[15:18]
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        with pytest.raises(io.UnsupportedOperation):
            f.fileno()
    with fs.open(p, "r+b") as f:
        f.seek(CHUNK)
        f.write(b"MID")
        f.seek(0)
        assert f.read(3) == payload[:3]
        assert f.truncate(2 * CHUNK) == 2 * CHUNK
    got = fs.read_bytes(p)
    assert got == payload[:CHUNK] + b"MID" + payload[CHUNK + 3:2 * CHUNK]


def test_append_mode_writes_at_the_end(fs, d):
    p = f"{d}/log"
    fs.write_bytes(p, b"start\n")
    with fs.open(p, "ab") as f:
        assert f.tell() == 6
        f.write(b"one\n")
        f.flush()
        f.seek(0)                     # append ignores the position
        f.write(b"two\n")
    with fs.open(p, "a+b") as f:
        f.write(b"three\n")
        f.seek(0)
        assert f.read() == b"start\none\ntwo\nthree\n"


def test_text_mode(fs, d):
    p = f"{d}/t.txt"
    with fs.open(p, "w", encoding="utf-8") as f:
        assert isinstance(f, io.TextIOWrapper) and f.mode == "w"
        f.write("héllo\nwörld\n")
    with fs.open(p) as f:
        assert f.readlines() == ["héllo\n", "wörld\n"]
    assert fs.read_text(p) == "héllo\nwörld\n"
    with fs.open(p, "a") as f:
        print("more", file=f)
    assert fs.read_bytes(p) == "héllo\nwörld\nmore\n".encode()
    with pytest.raises(ValueError):
        fs.open(p, "r", buffering=0)
    with pytest.raises(ValueError):
        fs.open(p, "rb", encoding="utf-8")


def test_open_modes_create_exclusive_truncate(fs, d):
    p = f"{d}/m"
    with pytest.raises(FileNotFoundError) as ei:
        fs.open(p, "rb")
    assert ei.value.filename == p and ei.value.errno == errno.ENOENT
    with fs.open(p, "xb") as f:
        f.write(b"12345")
    with pytest.raises(FileExistsError) as ei:
        fs.open(p, "xb")
    assert ei.value.filename == p
    with fs.open(p, "wb") as f:        # w truncates
        f.write(b"ab")
    assert fs.read_bytes(p) == b"ab"
    with pytest.raises(IsADirectoryError):
        fs.open(d, "rb")
    with pytest.raises(NotADirectoryError):
        fs.open(f"{p}/x", "rb")


def test_unlinked_file_stays_readable_while_open(fs, d):
    p = f"{d}/gone"
    fs.write_bytes(p, b"still here")
    with fs.open(p, "rb") as f:
        fs.remove(p)
        assert not fs.exists(p)
        assert f.read() == b"still here"


# ---- names and attributes ------------------------------------------------------------------------------------

def test_directories_listing_and_scandir(fs, d):
    fs.makedirs(f"{d}/a/b/c")
    fs.makedirs(f"{d}/a/b/c", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{d}/a/b/c")
    fs.write_bytes(f"{d}/a/file", b"x" * 7)
    fs.symlink("file", f"{d}/a/link")
    assert sorted(fs.listdir(f"{d}/a")) == ["b", "file", "link"]
    assert sorted(fs.listdir(f"{d}/a".encode())) == [b"b", b"file", b"link"]
    ents = {e.name: e for e in fs.scandir(f"{d}/a")}
    assert ents["b"].is_dir() and not ents["b"].is_file()
    assert ents["file"].is_file() and ents["file"].stat().st_size == 7
    assert ents["link"].is_symlink() and ents["link"].is_file()          # follows the link
    assert not ents["link"].is_file(follow_symlinks=False)
    assert ents["file"].path == f"{d}/a/file" and ents["file"].inode() == fs.stat(f"{d}/a/file").st_ino
    walked = list(fs.walk(f"{d}/a"))
    top, dirs, files = walked[0]
    assert (top, dirs, sorted(files)) == (f"{d}/a", ["b"], ["file", "link"])
    assert [w[0] for w in walked] == [f"{d}/a", f"{d}/a/b", f"{d}/a/b/c"]
    with pytest.raises(OSError) as ei:
        fs.rmdir(f"{d}/a/b")
    assert ei.value.errno == errno.ENOTEMPTY and ei.value.filename == f"{d}/a/b"
    with pytest.raises(NotADirectoryError):
        fs.listdir(f"{d}/a/file")


def test_large_directory_lists_every_entry(fs, d):
    names = [f"n{i:04d}" for i in range(1100)]        # more than one metadata page (1024)
    for n in names:
        fs.mknod(f"{d}/{n}")
    assert sorted(fs.listdir(d)) == names


def test_rename_link_symlink(fs, d):
    fs.write_bytes(f"{d}/a", b"A")
    fs.write_bytes(f"{d}/b", b"B")
    fs.rename(f"{d}/a", f"{d}/b")                      # replaces
    assert fs.read_bytes(f"{d}/b") == b"A" and not fs.exists(f"{d}/a")
    fs.mkdir(f"{d}/sub")
    fs.rename(f"{d}/b", f"{d}/sub/c")                  # across directories
    fs.link(f"{d}/sub/c", f"{d}/hard")
    st1, st2 = fs.stat(f"{d}/sub/c"), fs.stat(f"{d}/hard")
    assert st1.st_ino == st2.st_ino and st2.st_nlink == 2
    fs.symlink("sub/c", f"{d}/sym")
    assert fs.readlink(f"{d}/sym") == "sub/c"
    assert fs.read_bytes(f"{d}/sym") == b"A"
    assert stat.S_ISLNK(fs.lstat(f"{d}/sym").st_mode)
    with pytest.raises(OSError) as ei:
        fs.readlink(f"{d}/hard")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        fs.rename(d, f"{d}/sub/inside")                 # no directory loops
    assert ei.value.errno == errno.EINVAL


def test_names_resolve_from_their_cached_directory(fs, d):
    """A stat walks one name from its directory's cached inode, not the whole path,
    and gets the same answers as a whole walk: symlinks, '..', misses, renames."""
    meta = fs.core._s.meta
    calls = []
    real = type(meta).resolve_now

    def spy(path, follow=True, base=1, **kw):
        calls.append((bytes(path), base))
        return real(meta, path, follow, base, **kw)

    deep = f"{d}/a/b/c"
    fs.makedirs(deep)
    fs.write_bytes(f"{deep}/f", b"F")
    fs.symlink("f", f"{deep}/sym")
    c_ino = fs.stat(deep).st_ino
    fs.core.invalidate_cache()
    meta.resolve_now = spy
    try:
        assert fs.stat(f"{deep}/f").st_size == 1              # directory not cached: the whole path
        assert calls[-1] == (f"{deep}/f".encode(), 1)
        assert fs.stat(deep).st_ino == c_ino                  # caches c for...
        assert fs.stat(f"{deep}/f").st_size == 1              # ...one name from c
        assert calls[-1] == (b"f", c_ino)
        assert stat.S_ISLNK(fs.lstat(f"{deep}/sym").st_mode)
        assert fs.stat(f"{deep}/sym").st_size == 1            # the link's target, found from c
        assert calls[-1] == (b"sym", c_ino)
        assert fs.stat(f"{deep}/..").st_ino == fs.stat(f"{d}/a/b").st_ino
        assert calls[-2] == (f"{deep}/..".encode(), 1)        # '..' walks the whole path
        with pytest.raises(FileNotFoundError):
            fs.stat(f"{deep}/missing")
        fs.rename(f"{d}/a/b", f"{d}/a/moved")                 # forgets the cached directories
        with pytest.raises(FileNotFoundError):
            fs.stat(f"{deep}/f")
        assert fs.stat(f"{d}/a/moved/c/f").st_size == 1
        fs.mkdir(f"{d}/new")                                  # a new directory is cached at once
        fs.write_bytes(f"{d}/new/g", b"G")
        assert fs.stat(f"{d}/new/g").st_size == 1
        assert calls[-1] == (b"g", fs.stat(f"{d}/new").st_ino)
    finally:
        del meta.resolve_now


def test_reading_a_directory_is_eisdir(fs, d):
    fs.mkdir(f"{d}/sub")
    with pytest.raises(IsADirectoryError):
        fs.read_bytes(f"{d}/sub")
    with pytest.raises(IsADirectoryError):
        fs.pread(f"{d}/sub", bytearray(10), 0)


def test_chmod_chown_utime_truncate(fs, d):
    p = f"{d}/attrs"
    fs.write_bytes(p, os.urandom(2 * CHUNK + 10))
    fs.chmod(p, 0o640)
    assert stat.S_IMODE(fs.stat(p).st_mode) == 0o640
    fs.chown(p, 1234, 5678)
    st = fs.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    fs.chown(p, -1, 42)
    assert (fs.stat(p).st_uid, fs.stat(p).st_gid) == (1234, 42)
    fs.utime(p, ns=(1_600_000_000_123_456_789, 1_650_000_000_987_654_321))
    st = fs.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_600_000_000_123_456_789, 1_650_000_000_987_654_321)
    before = time.time()
    fs.utime(p)
    assert fs.stat(p).st_mtime >= before - 5
    original = fs.read_bytes(p)
    fs.truncate(p, CHUNK + 5)
    assert fs.read_bytes(p) == original[:CHUNK + 5]
    fs.truncate(p, 3 * CHUNK)                           # extension reads zeros, not old bytes
    assert fs.read_bytes(p) == original[:CHUNK + 5] + bytes(2 * CHUNK - 5)


def test_metadata_server_found_through_mgmtd(fly, fs):
    assert fs.meta_target.startswith("tcp://")           # its flyfs/net address, from the routing info
    from flyfs.client import FileSystem
    via_grpc = FileSystem(fly.mgmtd_address, meta=fly.meta_address)   # or given, over gRPC
    try:
        assert via_grpc.meta_target == fly.meta_address
        assert via_grpc.listdir("/") == fs.listdir("/")
    finally:
        via_grpc.close()


def test_statvfs_exists_access_xattrs(fs, d):
    sv = fs.statvfs("/")
    assert sv.f_namemax == 255 and sv.f_bsize > 0 and sv.f_blocks >= sv.f_bfree
    p = f"{d}/x"
    assert not fs.exists(p)
    fs.write_bytes(p, b"")
    assert fs.exists(p) and fs.isfile(p) and fs.isdir(d) and not fs.isdir(p)
    assert fs.access(p, os.R_OK | os.W_OK)
    fs.setxattr(p, "user.k", b"\x00\xffv")
    assert fs.getxattr(p, "user.k") == b"\x00\xffv"
    assert fs.listxattr(p) == ["user.k"]
    fs.removexattr(p, "user.k")
    with pytest.raises(OSError) as ei:
        fs.getxattr(p, "user.k")
    assert ei.value.errno == errno.ENODATA


def test_errors_have_errno_and_path(fs, d):
    cases = [
        (lambda: fs.stat(f"{d}/none"), errno.ENOENT, f"{d}/none"),
        (lambda: fs.mkdir(d), errno.EEXIST, d),
        (lambda: fs.rmdir(f"{d}/none"), errno.ENOENT, f"{d}/none"),
        (lambda: fs.remove(d), errno.EISDIR, d),
        (lambda: fs.listdir(f"{d}/none"), errno.ENOENT, f"{d}/none"),
        (lambda: fs.mkdir(f"{d}/" + "n" * 256), errno.ENAMETOOLONG, f"{d}/" + "n" * 256),
    ]
    for fn, code, path in cases:
        with pytest.raises(OSError) as ei:
            fn()
        assert (ei.value.errno, ei.value.filename) == (code, path)
    fs.mkdir(f"{d}/" + "n" * 255)                       # 255 bytes is fine


def test_as_user_permissions(fs, d):
    fs.chmod(d, 0o777)
    fs.write_bytes(f"{d}/secret", b"root only")
    fs.chmod(f"{d}/secret", 0o600)
    alice = fs.as_user(1000, [1000])
    with pytest.raises(PermissionError) as ei:
        alice.read_bytes(f"{d}/secret")
    assert ei.value.filename == f"{d}/secret"
    alice.write_bytes(f"{d}/mine", b"alice's")
    st = fs.stat(f"{d}/mine")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert alice.user == (1000, (1000,))
    with pytest.raises(PermissionError):
        alice.chown(f"{d}/mine", 0, 0)
    fs.chmod(f"{d}/secret", 0o640)
    fs.chown(f"{d}/secret", 0, 77)
    assert fs.as_user(1000, [1000, 77]).read_bytes(f"{d}/secret") == b"root only"   # supplementary group


# ---- length reporting, threads, pickling, asyncio -------------------------------------------------------

def test_length_visible_to_other_clients_after_fsync_and_periodically(fly, d):
    writer = fly.connect(length_report_interval=0.2)
    reader = fly.connect(dir_cache_ttl=0)
    try:
        p = f"{d}/growing"
        with writer.open(p, "wb", buffering=0) as f:
            f.write(b"a" * 1000)
            assert writer.stat(p).st_size == 1000          # the writer sees its own writes at once
            f.fsync()
            assert reader.stat(p).st_size == 1000
            f.write(b"b" * 2000)
            deadline = time.monotonic() + 10
            while reader.stat(p).st_size != 3000:            # the periodic report, no close
                assert time.monotonic() < deadline, "length never reported"
                time.sleep(0.05)
        assert reader.read_bytes(p) == b"a" * 1000 + b"b" * 2000
    finally:
        writer.close()
        reader.close()


def test_open_after_another_client_replaced_the_name_reads_the_new_file(fly, fs, d):
    """Close-to-open for names: a client that just read and stat'ed `p` opens it again
    after another client moved that file away and wrote a new one at `p`: it reads the
    new file, not the one it had seen under that name (found by a randomized run of
    two clients on two metadata servers)."""
    other = fly.connect()
    try:
        p = f"{d}/f"
        fs.write_bytes(p, b"old" * 100)
        assert fs.read_bytes(p) == b"old" * 100 and fs.stat(p).st_size == 300
        other.rename(p, f"{d}/moved")
        other.write_bytes(p, b"new" * 600)
        assert fs.read_bytes(p) == b"new" * 600
        with fs.open(p, "rb") as f:
            assert f.read() == b"new" * 600
        assert fs.read_bytes(f"{d}/moved") == b"old" * 100
        other.remove(p)
        with pytest.raises(FileNotFoundError):
            fs.read_bytes(p)
        other.symlink(f"{d}/moved", p)
        assert fs.read_bytes(p) == b"old" * 100
        with pytest.raises(OSError) as e:       # O_NOFOLLOW on a symlink
            fs._run_core("open_handle", p, os.O_RDONLY | os.O_NOFOLLOW)
        assert e.value.errno == errno.ELOOP
    finally:
        other.close()


def test_a_directory_another_client_recreated_is_no_false_enoent(fly, fs, d):
    """This client has the directory's inode cached (dir_cache_ttl); another client removes
    the directory and makes a new one under the same name (rank 0 resetting a checkpoint
    directory): creating, opening, removing, renaming, stat and listing in it still work,
    in the new directory, instead of failing with ENOENT for a path that exists."""
    other = fly.connect()
    try:
        ck = f"{d}/ckpt"
        fs.mkdir(ck)
        fs.write_bytes(f"{ck}/old", b"x")             # ckpt's inode now cached here
        for step in ("create", "mkdir", "open", "unlink", "rename", "symlink", "stat", "listdir"):
            other.remove(f"{ck}/old")
            for name in other.listdir(ck):
                p = f"{ck}/{name}"
                (other.rmdir if other.stat(p, follow_symlinks=False).st_mode & 0o40000 else other.remove)(p)
            other.rmdir(ck)
            other.mkdir(ck)
            other.write_bytes(f"{ck}/old", b"x")
            other.write_bytes(f"{ck}/there", b"there")
            if step == "create":
                fs.write_bytes(f"{ck}/new", b"n")
                assert other.read_bytes(f"{ck}/new") == b"n"
            elif step == "mkdir":
                fs.mkdir(f"{ck}/sub")
                assert other.stat(f"{ck}/sub").st_mode & 0o40000
            elif step == "open":
                assert fs.read_bytes(f"{ck}/there") == b"there"
            elif step == "unlink":
                fs.remove(f"{ck}/there")
                assert "there" not in other.listdir(ck)
            elif step == "rename":
                fs.rename(f"{ck}/there", f"{ck}/moved")
                assert other.read_bytes(f"{ck}/moved") == b"there"
            elif step == "symlink":
                fs.symlink("there", f"{ck}/link")
                assert other.read_bytes(f"{ck}/link") == b"there"
            elif step == "stat":
                assert fs.stat(f"{ck}/there").st_size == 5 and fs.exists(f"{ck}/old")
            else:
                assert sorted(fs.listdir(f"{ck}/")) == ["old", "there"]
    finally:
        other.close()


@pytest.mark.parametrize("mode", ["wb", "w+b", "w"])
def test_flush_of_a_file_object_reaches_the_chains(fly, fs, d, mode):
    """flush() of a buffered or text file object does what RawFile.flush does (the
    built-in classes stop at handing their buffer over): another client sees the
    bytes, which outlive the writer; close still ends with one metadata call."""
    from flyfs.client.meta_client import MetaClient
    other = fly.connect()
    try:
        p = f"{d}/flushed-{mode.replace('+', 'p')}"
        data = "line\n" * 1000 if mode == "w" else b"B" * 5000
        f = fs.open(p, mode)
        f.write(data)
        assert other.stat(p).st_size == 0
        f.flush()
        assert other.stat(p).st_size == 5000
        assert other.read_bytes(p) == (data.encode() if mode == "w" else data)
        calls = []
        real = MetaClient._call

        async def counted(self, method, *a, **kw):
            calls.append(method)
            return await real(self, method, *a, **kw)
        MetaClient._call = counted
        try:
            f.write(data)
            f.close()
        finally:
            MetaClient._call = real
        assert calls == ["Close"]                      # no Sync before it
        assert other.stat(p).st_size == 10000
    finally:
        other.close()


def test_threads_writing_different_files(fs, d):
    errors = []

    def worker(k):
        try:
            for j in range(5):
                data = os.urandom(CHUNK // 2 * (k + j + 1))
                p = f"{d}/w{k}-{j}"
                fs.write_bytes(p, data)
                assert fs.read_bytes(p) == data
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(fs.listdir(d)) == 40


def test_threads_sharing_one_file(fs, d):
    p = f"{d}/shared"
    fs.write_bytes(p, bytes(8 * CHUNK))
    with fs.open(p, "r+b", buffering=0) as f:
        def worker(k):
            fs.pwrite(f, bytes([k + 1]) * CHUNK, k * CHUNK)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert fs.read_bytes(p) == b"".join(bytes([k + 1]) * CHUNK for k in range(8))


def test_pickle_reconnects(fs, d):
    p = f"{d}/pk"
    fs.write_bytes(p, b"pickled")
    fs2 = pickle.loads(pickle.dumps(fs))
    try:
        assert fs2.read_bytes(p) == b"pickled"
        bob = pickle.loads(pickle.dumps(fs.as_user(2000, [2000])))
        assert bob.user == (2000, (2000,))
    finally:
        fs2.close()


async def test_async_api(fly, d):
    afs = await AsyncFileSystem.connect(fly.mgmtd_address, meta=fly.meta_address,
                                        config=ClientConfig(dir_cache_ttl=0))
    try:
        p = f"{d}/async"
        await afs.write_bytes(p, b"z" * (CHUNK + 1))
        h = await afs.open_handle(p, os.O_RDWR)
        buf = bytearray(4)
        assert await afs.pread_into(h, buf, CHUNK - 2) == 3 and buf[:3] == b"zzz"
        assert await afs.pwrite(h, b"END", CHUNK + 1) == 3
        await afs.close_handle(h)
        assert (await afs.stat(p)).st_size == CHUNK + 4
        assert [e.name async for e in afs.iterdir(d)] == [b"async"]
    finally:
        await afs.close()


def test_write_behind_keeps_the_order_of_overlapping_writes(fs, d):
    """What the FUSE mount does: many small writes in flight at once, some overlapping;
    the file must end up as if they had been applied one after the other."""
    import random
    p = f"{d}/wb"
    size = 6 * CHUNK
    model = bytearray(size)
    rng = random.Random(3)

    async def go(core):
        h = await core.open_handle(p, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for i in range(300):
                off = rng.randrange(0, size - 9000)
                n = rng.choice([100, 4096, 9000])
                data = bytes([i % 251 + 1]) * n
                model[off:off + n] = data
                assert await core.write_behind(h, data, off) == n
                if i % 50 == 0:            # a read waits for the writes it may overlap
                    got = bytearray(n)
                    await core.pread_into(h, got, off)
                    assert got == data
            await core.flush(h)
        finally:
            await core.close_handle(h)

    fs._run(go)
    end = max(i for i in range(size) if model[i]) + 1
    assert fs.read_bytes(p) == bytes(model[:end])


async def test_in_process_meta_service(fly):
    """AsyncFileSystem over a MetaService running on the caller's own loop (no metadata
    gRPC) and the cluster's storage."""
    from flyfs.client.io import DataPlane
    from flyfs.client.storage_client import StorageClient
    from flyfs.kv import open_engine
    from flyfs.metaserver import MetaConfig, MetaService, static_chain_table

    chains = fly.run(fly.storage.routing()).table(1)
    engine = open_engine(f"memory://inproc-{uuid.uuid4().hex}")
    svc = MetaService(engine, chain_table=static_chain_table(chains),
                      config=MetaConfig(default_chunk_size=CHUNK, default_stripe=2))
    await svc.format()
    afs = AsyncFileSystem.from_parts(svc, DataPlane(StorageClient(fly.mgmtd_address)))
    try:
        data = os.urandom(3 * CHUNK + 9)
        await afs.makedirs("/x/y")
        await afs.write_bytes("/x/y/f", data)
        assert await afs.read_bytes("/x/y/f") == data
        assert (await afs.stat("/x/y/f")).st_size == len(data)
        assert await afs.listdir("/x") == ["y"]
        with pytest.raises(FileNotFoundError):
            await afs.stat("/x/nope")
    finally:
        await afs.close()
        await svc.stop()
        await engine.close()
