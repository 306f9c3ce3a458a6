"""Benchmark plumbing: start-or-reuse a cluster, report helpers, the bench entry points."""
import os
import subprocess
import sys

import pytest

from flyfs.bench import report, suite


def test_given_cluster_is_used_as_is():
    with suite.cluster("flyfs://127.0.0.1:7777/") as c:
        assert c.address == "127.0.0.1:7777"
        assert not c.started_here and c.pids() == {} and c.cpu() == {}
        assert "(given)" in c.describe()
    with pytest.raises(ValueError):
        with suite.cluster("no-port-here"):
            pass


def test_temporary_cluster_lifecycle(tmp_path):
    import flyfs
    with suite.cluster(None, data_dir=str(tmp_path), quiet=True, chunk_size=1 << 20) as c:
        assert c.started_here and os.path.isdir(c.data_dir)
        assert c.data_dir.startswith(str(tmp_path))
        pids = c.pids()
        assert {"mgmtd", "meta", "storage-0", "storage-1", "storage-2"} <= set(pids)
        fs = flyfs.connect(c.address)
        try:
            fs.write_bytes("/x", b"y" * 3_000_000)
            assert fs.stat("/x").st_size == 3_000_000
        finally:
            fs.close()
        cpu = c.cpu()
        assert set(cpu) == set(pids) and all(v >= 0 for v in cpu.values())
        assert sum(cpu.values()) > 0
        assert "chunk 1 MiB" in c.describe()
        # the same daemons, found from the address alone (a cluster given with --cluster)
        found = suite.Cluster(c.address).pids()
        assert sorted(found.values()) == sorted(pids.values())
        assert sorted(n.split("-")[0] for n in found) == ["meta", "mgmtd", "storage", "storage", "storage"]
    # stopped and removed
    for pid in pids.values():
        assert suite.process_cpu(pid) == 0.0 or not _alive(pid)
    assert not os.path.exists(c.data_dir)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_cpu_delta_and_process_cpu():
    assert suite.cpu_delta({"a": 1.0}, {"a": 3.5, "b": 1.0}) == {"a": 2.5, "b": 1.0}
    me = suite.process_cpu(os.getpid())
    sum(i * i for i in range(200_000))
    assert suite.process_cpu(os.getpid()) >= me > 0
    assert suite.process_cpu(2 ** 22 + 12345) == 0.0


def test_report_helpers(capsys):
    assert report.fmt_ratio(3.0, 2.0) == "1.50x"
    assert report.fmt_ratio(1.0, 400.0) == "0.003x"
    assert report.fmt_ratio(1.0, 0.0) == "" and report.fmt_ratio(None, 1.0) == ""
    assert report.fmt_bytes(1.5e9) == "1.50 GB" and report.fmt_bytes(512) == "512 B"
    assert report.fmt_seconds(1.234) == "1.23 s"
    finished = []
    bars = report.PhaseBars("x ", on_phase=lambda ph, s: finished.append(ph))
    for ph, total in (("gen", 2), ("sort", 3)):
        bars(ph, 0, total)
        for d in range(1, total + 1):
            bars(ph, d, total)
    assert finished == ["gen", "sort"]
    err = capsys.readouterr().err
    assert "x gen" in err and "x sort" in err and "100.0%" in err


def test_cli_lists_io_and_graysort():
    out = subprocess.run([sys.executable, "-m", "flyfs.cli", "bench", "--help"], capture_output=True,
                         text=True, timeout=60).stdout
    assert "io" in out and "graysort" in out


@pytest.mark.slow
def test_bench_all_quick():
    """`flyfs bench all --quick` runs every bench (minutes)."""
    r = subprocess.run([sys.executable, "-m", "flyfs.cli", "bench", "all", "--quick"],
                       capture_output=True, text=True, timeout=900)
    assert "flyfs / local total time" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kv-cache-like get" in r.stdout
