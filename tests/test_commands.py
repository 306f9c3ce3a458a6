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
    # Each node splits its disk's free space among its targets, and capacity is
    # divided by the replication: exact when every node has its own disk (or, as
    # with `flyfs up`, replicas == nodes); here 3 co-located nodes with 2 replicas
    # overstate it by nodes / replicas.
    overstate = 3 / 2
    assert free <= disk.free * overstate * 1.05 + (64 << 20)
    assert free >= disk.free * overstate * 0.8
