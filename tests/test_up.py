"""End-to-end: `flyfs up` as a subprocess — real daemons, real FUSE mount."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="fuse: /dev/fuse missing")

LINE = re.compile(r"^flyfs up: mgmtd=(\S+) mount=(\S+)$")


class Up:
    """A running `flyfs up` process."""

    def __init__(self, data_dir, mount, *extra):
        self.data_dir, self.mount = str(data_dir), str(mount)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flyfs.cli", "up", "--data-dir", self.data_dir, "--mount", self.mount,
             "--heartbeat-timeout", "3", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        line = self._first_line(timeout=180)
        m = LINE.match(line)
        assert m, f"unexpected first line {line!r}; stderr: {''.join(self.stderr)[-2000:]}"
        self.mgmtd, mounted = m.group(1), m.group(2)
        assert mounted == os.path.abspath(self.mount)

    def _first_line(self, timeout):
        out = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            self.proc.kill()
            raise AssertionError(f"flyfs up printed nothing in {timeout} s; stderr: {''.join(self.stderr)[-3000:]}")
        return out[0].rstrip("\n")

    def status(self):
        out = subprocess.run([sys.executable, "-m", "flyfs.cli", "status", "--cluster", self.mgmtd, "--json"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert not _mounted(self.mount), "mount left behind after flyfs up stopped"


def _mounted(path):
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == real for line in f)


@pytest.fixture
def up(tmp_path):
    started = []

    def start(*extra):
        u = Up(tmp_path / "data", tmp_path / "mnt", *extra)
        started.append(u)
        return u
    yield start
    for u in reversed(started):
        try:
            u.stop()
        except AssertionError:
            subprocess.run(["fusermount3", "-u", "-z", u.mount])
            raise


def test_up_mount_and_api_roundtrip_then_restart(up, tmp_path):
    import flyfs
    u = up("--chunk-size", "256KiB")
    st = u.status()
    assert len([n for n in st["nodes"] if n["type"] == "storage"]) == 3
    assert st["chains"] and all(len(c["targets"]) == 3 for c in st["chains"])
    assert all(t["state"] == "SERVING" for c in st["chains"] for t in c["targets"])

    payload = os.urandom(3 * 256 * 1024 + 123)
    with open(os.path.join(u.mount, "via-mount.bin"), "wb") as f:
        f.write(payload)
    fs = flyfs.connect(u.mgmtd)
    assert fs.read_bytes("/via-mount.bin") == payload
    fs.makedirs("/api/dir", exist_ok=True)
    fs.write_bytes("/api/dir/via-api.bin", payload[::-1])
    with open(os.path.join(u.mount, "api/dir/via-api.bin"), "rb") as f:
        assert f.read() == payload[::-1]
    # small files (held by the metadata service), one grown past the limit afterwards
    small = {"tiny.txt": b"hi\n", "page.bin": os.urandom(4000), "grown.bin": os.urandom(3000)}
    for name, data in small.items():
        with open(os.path.join(u.mount, name), "wb") as f:
            f.write(data)
    with open(os.path.join(u.mount, "grown.bin"), "ab") as f:
        f.write(payload[:10000])
    small["grown.bin"] += payload[:10000]
    fs.write_bytes("/api/small.bin", b"api small")
    small["api/small.bin"] = b"api small"
    fs.close()

    u.stop()
    u2 = up("--chunk-size", "256KiB")
    with open(os.path.join(u2.mount, "via-mount.bin"), "rb") as f:
        assert f.read() == payload
    assert sorted(os.listdir(os.path.join(u2.mount, "api/dir"))) == ["via-api.bin"]
    for name, data in small.items():
        with open(os.path.join(u2.mount, name), "rb") as f:
            assert f.read() == data, name


def test_kill9_storage_daemon_under_io_through_mount(up):
    u = up("--chunk-size", "256KiB")
    st = u.status()
    victim = next(n for n in st["nodes"] if n["type"] == "storage")
    blocks = {}
    errors = []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set() and i < 400:
            data = os.urandom(64 * 1024 + i)
            path = os.path.join(u.mount, f"f{i:04d}")
            try:
                with open(path, "wb") as f:
                    f.write(data)
                blocks[path] = data
            except OSError as e:
                errors.append(f"{path}: {e}")
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(2)
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(8)
    stop.set()
    t.join(120)
    assert not errors, errors[:5]
    assert len(blocks) > 10
    for path, data in blocks.items():
        with open(path, "rb") as f:
            assert f.read() == data, path


def test_kill9_of_up_leaves_no_stuck_mount(up, tmp_path):
    u = up()
    with open(os.path.join(u.mount, "keep.txt"), "w") as f:
        f.write("still here")
    u.proc.kill()
    u.proc.wait()
    time.sleep(1)
    u2 = up()  # must clear the stale mount and come back with the data
    with open(os.path.join(u2.mount, "keep.txt")) as f:
        assert f.read() == "still here"


def test_up_on_etcd_without_mount(tmp_path, etcd_server):
    import flyfs
    proc = subprocess.Popen([sys.executable, "-m", "flyfs.cli", "up", "--data-dir", str(tmp_path / "d"), "--no-mount",
                             "--kv", f"etcd://{etcd_server.endpoint}/up{os.getpid()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        m = LINE.match(line)
        assert m and m.group(2) == "-", (line, proc.stderr.read() if proc.poll() is not None else "")
        fs = flyfs.connect(m.group(1))
        fs.write_bytes("/on-etcd.txt", b"metadata in etcd")
        assert fs.read_bytes("/on-etcd.txt") == b"metadata in etcd"
        assert fs.listdir("/") == ["on-etcd.txt"]
        fs.close()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


def test_a_daemon_that_dies_at_start_is_reported_with_its_reason(tmp_path):
    """flyfs up's error for a daemon that exits while starting carries the daemon's own
    last line (one line to read), not only a pointer to its log."""
    from flyfs.cluster.procs import Daemon, free_port, wait_port
    port = free_port()
    d = Daemon("meta", ["meta", "--kv", "nope://x", "--mgmtd", "127.0.0.1:1", "--listen", f"127.0.0.1:{port}"],
               str(tmp_path / "meta.log")).start()
    with pytest.raises(RuntimeError) as e:
        wait_port("127.0.0.1", port, 30, d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("meta exited with 1: flyfs meta: unknown KV engine URL 'nope://x'")
    assert str(tmp_path / "meta.log") in msg


@pytest.mark.parametrize("bad", [["--inline-max", "70000"], ["--inline-max", "-1"], ["--sync-interval", "0"]])
def test_flyfs_meta_refuses_a_bad_setting_in_one_line(bad):
    r = subprocess.run([sys.executable, "-m", "flyfs.cli", "meta", "--kv", "memory://x", *bad],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("flyfs meta: "), r.stderr
