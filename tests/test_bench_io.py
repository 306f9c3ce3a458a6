"""`flyfs bench io` against a real cluster, with tiny sizes."""
import pytest

from flyfs.bench import io as bench_io
from flyfs.bench import suite


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with suite.cluster(None, data_dir=str(tmp_path_factory.mktemp("io-cluster")), quiet=True) as c:
        yield c


def table(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("workload "))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("flyfs/local:"):
            break
        rows.append([c.strip() for c in line.split("  ") if c.strip()])
    return rows


def test_io_bench_prints_ratios(cluster, capsys):
    import flyfs
    rc = bench_io.main(["--cluster", cluster.address, "--size", "2MiB", "--budget", "512KiB",
                        "--max-pieces", "16", "--preads", "8", "--keys", "5", "--value-size", "16KiB"])
    out = capsys.readouterr().out
    assert rc == 0, out
    header = next(line for line in out.splitlines() if line.startswith("workload "))
    assert header.split() == ["workload", "via", "pieces", "flyfs", "local", "flyfs/local"]
    rows = table(out)
    seen = {(r[0], r[1]) for r in rows}
    for size in ("4 KiB", "64 KiB", "1024 KiB"):
        assert (f"random read {size}", "batch_read") in seen and (f"random read {size}", "pread") in seen
    assert ("kv-cache-like get, 16 KiB values", "batch_read by path") in seen
    assert ("kv-cache-like get, 16 KiB values", "batch_read, files open") in seen
    for r in rows:
        assert r[-1].endswith("x") and float(r[-1][:-1]) > 0, r
        assert "MiB/s" in r[3] and "MiB/s" in r[4]
    counts = {(r[0], r[1]): int(r[2]) for r in rows}
    assert counts[("random read 4 KiB", "batch_read")] == 16   # capped by --max-pieces
    assert counts[("random read 4 KiB", "pread")] == 8         # capped by --preads
    assert counts[("random read 1024 KiB", "batch_read")] == 1  # capped by --budget (512 KiB)
    # it cleans up after itself on the cluster
    fs = flyfs.connect(cluster.address)
    try:
        assert not [n for n in fs.listdir("/") if n.startswith("bench-io-")]
    finally:
        fs.close()


def test_io_bench_rejects_tiny_file(cluster):
    with pytest.raises(SystemExit):
        bench_io.main(["--cluster", cluster.address, "--size", "4KiB"])
