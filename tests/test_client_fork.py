"""Fork safety: a process that forks while using a FileSystem (threads busy
with it, a file open) has children that use the inherited client, exit 0 and
never hang; multiprocessing pools (fork and spawn, as PyTorch DataLoader
workers use) read through it.

The client runs in a fresh Python process (not pytest's, which runs gRPC
servers of other tests) against daemons that are child processes.
"""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from test_client_cluster import FlyCluster

SCRIPT = r'''
import multiprocessing as mp, os, signal, sys, threading, time, traceback
import flyfs.client as fc

FS = None


def read_one(path):          # a fork-pool worker: uses the client inherited from the parent
    return len(FS.read_bytes(path))


def spawned(fs, path, q):    # a spawned worker: gets the client pickled
    q.put(len(fs.read_bytes(path)))


def child(fs, f, d, k, payload):
    signal.alarm(60)         # a hung child dies of SIGALRM, which the parent reports
    try:
        assert fs.read_bytes(d + "/parent") == payload
        fs.write_bytes(f"{d}/child{k}", str(os.getpid()).encode())
        assert f.read(5) == payload[10:15]          # an inherited open file
        assert "parent" in fs.listdir(d)
        out = []
        ts = [threading.Thread(target=lambda: out.append(fs.read_bytes(d + "/parent"))) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert out == [payload] * 3
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def main():
    global FS
    mgmtd, d = sys.argv[1:3]
    fs = FS = fc.connect(mgmtd)              # the metadata server comes from mgmtd's routing info
    fs.makedirs(d, exist_ok=True)
    payload = bytes(range(256)) * 1000
    fs.write_bytes(d + "/parent", payload)
    f = fs.open(d + "/parent", "rb")
    assert f.read(10) == payload[:10]

    stop = False

    def busy():              # control- and data-plane calls in flight while the process forks
        while not stop:
            fs.stat(d + "/parent")
            fs.read_bytes(d + "/parent")

    threads = [threading.Thread(target=busy) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    pids = []
    for k in range(3):
        pid = os.fork()
        if pid == 0:
            child(fs, f, d, k, payload)
        pids.append(pid)
    codes = []
    deadline = time.monotonic() + 90
    for pid in pids:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes.append(os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                codes.append("hung")
                break
            time.sleep(0.02)
    stop = True
    for t in threads:
        t.join()
    print("children", codes, flush=True)
    assert codes == [0, 0, 0], codes
    for k, pid in enumerate(pids):
        assert fs.read_bytes(f"{d}/child{k}") == str(pid).encode()   # the parent still works

    paths = [f"{d}/parent"] + [f"{d}/child{k}" for k in range(3)]
    with mp.get_context("fork").Pool(2) as pool:
        assert pool.map(read_one, paths * 3) == [len(fs.read_bytes(p)) for p in paths] * 3
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=spawned, args=(fs, d + "/parent", q))
    p.start()
    assert q.get(timeout=60) == len(payload)
    p.join(60)
    assert p.exitcode == 0
    f.close()
    fs.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def procs_cluster(tmp_path_factory):
    c = FlyCluster(tmp_path_factory.mktemp("flyproc"), processes=True).start()
    yield c
    c.stop()


def test_forked_children_use_the_inherited_client(procs_cluster, tmp_path):
    script = tmp_path / "forker.py"
    script.write_text(SCRIPT)
    d = "/fork-" + uuid.uuid4().hex[:8]
    r = subprocess.run([sys.executable, str(script), procs_cluster.mgmtd_address, d],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "OK" in r.stdout, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    assert "children [0, 0, 0]" in r.stdout
