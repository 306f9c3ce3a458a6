"""GraySort on a real flyfs cluster (LocalCluster: mgmtd, meta, 3 storage daemons)
through the picklable FS adapter, and the `flyfs bench graysort` command line."""
import pickle

import pytest

from flyfs.bench import gensort, graysort, suite, valsort
from flyfs.bench.flyfs_fs import FlyfsFS
from flyfs.bench.graysort import FS, run_graysort
from flyfs.bench.valsort import RECORD_SIZE


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with suite.cluster(None, data_dir=str(tmp_path_factory.mktemp("gs-cluster")), quiet=True) as c:
        yield c


@pytest.fixture
def fs(cluster):
    a = FlyfsFS(cluster.address)
    yield a
    a.close()


def test_adapter_is_a_picklable_fs(fs, cluster):
    assert isinstance(fs, FS)
    fs.makedirs("/adapter/a/b", exist_ok=True)
    fs.makedirs("/adapter/a/b", exist_ok=True)
    with fs.open("/adapter/a/b/x", "wb") as f:
        f.write(b"hello " * 1000)
    with fs.open("/adapter/a/y", "wb") as f:
        f.write(b"")
    assert fs.size("/adapter/a/b/x") == 6000 and fs.size("/adapter/a/y") == 0
    assert fs.listdir("/adapter/a") == ["b", "y"]
    # a copy made by pickling (what a spawned worker gets) connects on its own
    other = pickle.loads(pickle.dumps(fs))
    assert other._client is None and other.address == cluster.address
    try:
        with other.open("/adapter/a/b/x", "rb") as f:
            assert f.read() == b"hello " * 1000
        assert isinstance(fs(), FlyfsFS) and fs() is not fs
    finally:
        other.close()
    with pytest.raises(FileNotFoundError):
        fs.size("/adapter/missing")
    with pytest.raises(FileNotFoundError):
        fs.open("/adapter/missing", "rb")
    with pytest.raises(ValueError, match="binary"):
        fs.open("/adapter/a/y", "r")
    fs.rmtree("/adapter")
    assert not fs.exists("/adapter")
    with pytest.raises(FileNotFoundError):
        fs.rmtree("/adapter")


def test_graysort_on_flyfs_validates(fs, cluster):
    n, parts = 100_000, 4
    events = []
    res = run_graysort(FlyfsFS(cluster.address), n, parts, 2, dir="/gs-test", keep=True,
                       progress=lambda ph, d, t: events.append((ph, d, t)))
    assert res.ok, res.errors
    assert res.summary.records == n and res.summary.ordered and res.summary.duplicates == 0
    # deterministic in N: the input is gensort records 0..N-1 whatever the worker count
    expected = gensort.generate(0, n)
    assert res.input_checksum == valsort.checksum(expected) == res.summary.checksum
    # the outputs, read back through the client and concatenated in order, are the
    # input records sorted by key (checked with Python's sort, not ours)
    out = b"".join(fs.client.read_bytes(f"/gs-test/output/part-{p:05d}") for p in range(parts))
    assert len(out) == n * RECORD_SIZE
    got = [out[i:i + RECORD_SIZE] for i in range(0, len(out), RECORD_SIZE)]
    assert got == sorted(r.tobytes() for r in expected)
    assert fs.listdir("/gs-test/input") == ["in-00000", "in-00001"]
    assert len(fs.listdir("/gs-test/tmp")) == 2 * parts
    for ph, total in (("gen", 2), ("phase1", 2), ("phase2", parts), ("validate", parts)):
        assert (ph, 0, total) in events and (ph, total, total) in events
    # every phase accounted for: time in metadata, reads, writes and compute adds up
    for ph in ("gen", "phase1", "phase2", "validate"):
        c = res.costs[ph]
        assert c["wall"] > 0 and c["cpu"] > 0
        parts_sum = c["meta"] + c["read"] + c["write"] + c["compute"]
        assert parts_sum == pytest.approx(c["wall"], rel=0.05, abs=0.05)
    assert res.costs["gen"]["write"] > 0 and res.costs["validate"]["read"] > 0
    fs.rmtree("/gs-test")


def test_graysort_cli_against_cluster(cluster, tmp_path, capsys):
    graysort.settle(cluster.address, 1 << 62, 0)   # earlier tests' removals done and reported
    used_before, replicas, _ = graysort._used_bytes(cluster.address)
    rc = graysort.main(["--cluster", cluster.address, "--records", "20k", "--partitions", "3",
                        "--workers", "1", "--local", str(tmp_path / "local"), "--dir", "/gs-cli"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "records: 20,000 (2.0 MB)" in out and "partitions: 3" in out
    header = next(line for line in out.splitlines() if line.startswith("item "))
    assert header.split() == ["item", "flyfs", "local", "ratio"]
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    for item in ("gen time", "phase1 time", "phase2 time", "validate time", "total time (gen to validate)",
                 "sort throughput", "sort throughput (TiB/min)", "sort records/s"):
        assert item in rows, item
        assert rows[item].rstrip().endswith("x"), rows[item]  # a ratio is printed
    assert rows["validation"].split()[1:3] == ["OK", "OK"]
    # the local run started once flyfs had removed the run's input and intermediates
    assert "flyfs's background removals done and a quiet machine again" in out
    assert graysort._used_bytes(cluster.address)[0] <= used_before + 20_000 * 100 * replicas * 1.01 + (1 << 20)
    checksum = format(valsort.checksum(gensort.generate(0, 20_000)), "x")
    assert rows["output checksum"].split()[2:4] == [checksum, checksum]
    assert "flyfs / local total time:" in out
    profile = [line.split() for line in out.splitlines() if line.startswith(("flyfs ", "local "))]
    assert {(r[0], r[1]) for r in profile} >= {("flyfs", "gen"), ("local", "validate")}
    # the given local directory keeps the local output
    assert (tmp_path / "local" / "gs-cli" / "output" / "part-00002").exists()


def test_local_fsync_baseline(tmp_path):
    fs = graysort.LocalFS(str(tmp_path), fsync=True)
    assert pickle.loads(pickle.dumps(fs)).fsync
    fs.makedirs("/d")
    with fs.open("/d/f", "wb") as f:
        f.write(b"abc")
    assert f.closed and fs.size("/d/f") == 3
    res = run_graysort(fs, 5000, 2, 1)
    assert res.ok, res.errors


def test_overlap_propagates_errors():
    costs = graysort.Costs()
    with graysort._Overlap(costs, 2) as io:
        io.submit(lambda: 1)
        io.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            io.wait("write")
        io.submit(lambda: 7)
        assert io.wait("read") == [7]
    done = costs.done()
    assert done["write"] >= 0 and set(done) == {"meta", "read", "write", "compute", "wall", "cpu"}


def test_graysort_quick_standalone(capsys):
    """`flyfs bench graysort --quick`: starts its own cluster and a local baseline."""
    rc = graysort.main(["--quick"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(temporary:" in out and "flyfs / local total time:" in out


@pytest.mark.slow
def test_graysort_goal_size_on_cluster(cluster, tmp_path, capsys):
    """The issue-6 measurement (1 GB): prints figures, never fails for being slow."""
    rc = graysort.main(["--cluster", cluster.address, "--records", "10M", "--partitions", "8",
                        "--workers", "2", "--local", str(tmp_path / "gslocal")])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert rows["validation"].split()[1:3] == ["OK", "OK"]
    print(out)
