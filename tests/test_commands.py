"""`flyfs set-layout`, `flyfs stat`, `flyfs ls` against a running cluster (as subprocesses)."""
import subprocess
import sys

from test_client_cluster import fly, fs  # noqa: F401  (module-scoped cluster fixtures)


def flyfs(*args):
    return subprocess.run([sys.executable, "-m", "flyfs.cli", *args], capture_output=True, text=True, timeout=60)


def test_set_layout_stat_and_ls(fly, fs):
    fs.makedirs("/cmd/wide", exist_ok=True)
    out = flyfs("set-layout", "--cluster", fly.mgmtd_address, "/cmd/wide", "--chunk-size", "128KiB", "--stripe", "2")
    assert out.returncode == 0, out.stderr
    fs.write_bytes("/cmd/wide/f.bin", b"x" * 1000)
    assert fs.stat("/cmd/wide/f.bin").st_blksize == 128 * 1024  # the new file took the directory's layout

    out = flyfs("stat", "--cluster", fly.mgmtd_address, "/cmd/wide/f.bin")
    assert out.returncode == 0, out.stderr
    assert "size: 1000" in out.stdout and "-rw" in out.stdout

    out = flyfs("ls", "--cluster", fly.mgmtd_address, "-l", "/cmd/wide")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("1000 f.bin")


def test_command_errors_are_one_line(fly):
    out = flyfs("stat", "--cluster", fly.mgmtd_address, "/no/such/file")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "No such file" in out.stderr
    out = flyfs("set-layout", "--cluster", fly.mgmtd_address, "/", "--chunk-size", "3000", "--stripe", "1")
    assert out.returncode == 1 and "chunk size" in out.stderr


def test_up_refuses_a_bad_layout_before_starting_anything(tmp_path):
    for args, want in ((["--chunk-size", "3MiB"], "--chunk-size 3145728 must be a power of two"),
                       (["--replicas", "5"], "--replicas 5 needs at least 5 storage nodes")):
        out = flyfs("up", "--no-mount", "--data-dir", str(tmp_path / "up"), *args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and want in out.stderr, out.stderr
        assert not (tmp_path / "up").exists()


def test_statvfs_follows_the_disk(fly, fs, tmp_path):
    import shutil
    st = fs.statvfs("/")
    disk = shutil.disk_usage(tmp_path)
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    assert 0 < free <= size
    # Each node splits its disk's free space among its targets; the metadata service
    # counts a disk's free space once (these 3 nodes share one) and divides by the
    # replication (2 here): what a user can still write.
    assert free <= disk.free / 2 * 1.05 + (64 << 20)
    assert free >= disk.free / 2 * 0.8


def test_disk_space_counts_a_shared_disk_once():
    from types import SimpleNamespace as T

    from flyfs.metaserver.attrs import disk_space
    gb = 1 << 30
    targets = [T(target_id=1, node_id=1, device="h:8", used_bytes=1 * gb, total_bytes=1 * gb + 50 * gb),
               T(target_id=2, node_id=1, device="h:8", used_bytes=2 * gb, total_bytes=2 * gb + 50 * gb),
               T(target_id=3, node_id=2, device="h:8", used_bytes=3 * gb, total_bytes=3 * gb + 100 * gb),
               T(target_id=4, node_id=3, device="g:8", used_bytes=0, total_bytes=70 * gb),
               T(target_id=5, node_id=4, device="", used_bytes=0, total_bytes=5 * gb)]
    # h:8 has 100 GiB free (node 1 splits it over two targets, node 2 reports all of it);
    # g:8 is another host's disk; target 5 reports no device and counts on its own.
    assert disk_space(targets) == (6 * gb, 100 * gb + 70 * gb + 5 * gb)
