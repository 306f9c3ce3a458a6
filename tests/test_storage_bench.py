"""`flyfs bench storage` runs end to end (a benchmark, not a timed test)."""
import re

import pytest

from flyfs.bench.storage import main

ROW = re.compile(r"^(write|read), chain of ([13]), ([14]) MiB\s+([\d.]+) (\S?B/s)\s+([\d.]+) (\S?B/s)\s+([\d.]+)")


@pytest.mark.slow
def test_bench_storage_prints_every_figure_and_ratio(tmp_path, capsys):
    assert main(["--size", "8MiB", "--depth", "2", "--data-dir", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr().out
    # the baseline is the kind of socket the cluster uses: Unix between same-host peers
    assert "raw tcp socket, 1 MiB blocks" in out and "raw tcp socket, 4 MiB blocks" in out
    assert "raw unix socket, 1 MiB blocks (the baseline)" in out
    assert "raw unix socket, 4 MiB blocks (the baseline)" in out
    rows = [ROW.match(line) for line in out.splitlines()]
    found = {(m[1], m[2], m[3]) for m in rows if m}
    assert found == {(op, c, s) for op in ("write", "read") for c in "13" for s in "14"}
    for m in filter(None, rows):
        value, baseline, ratio = float(m[4]), float(m[6]), float(m[8])
        assert value > 0 and baseline > 0 and ratio > 0
    # The disk ceiling (1 and 3 copies written, one read back) per request size, a "vs
    # disk" ratio beside every figure, and CPU per MiB (client / storage daemons) too.
    disk = {(m[1], m[2]) for m in re.finditer(r"^disk: ([13]) x ([14]) MiB writes\s+[\d.]+ \S?B/s",
                                               out, re.M)}
    assert disk == {(k, s) for k in "13" for s in "14"}
    assert len(re.findall(r"^disk: [14] MiB reads\s+[\d.]+ \S?B/s", out, re.M)) == 2
    writes = re.findall(r"^write, chain of [13], [14] MiB\s+\S+ \S+\s+\S+ \S+\s+[\d.]+\s+([\d.]+)\s+"
                        r"([\d.]+) / ([\d.]+)", out, re.M)
    assert len(writes) == 4 and all(float(r) > 0 and float(c) >= 0 and float(s) >= 0 for r, c, s in writes)
    reads = re.findall(r"^read, chain of [13], [14] MiB\s+\S+ \S+\s+\S+ \S+\s+[\d.]+\s+[\d.]+\s+"
                       r"([\d.]+) / ([\d.]+)", out, re.M)
    assert len(reads) == 4 and all(float(c) >= 0 and float(s) >= 0 for c, s in reads)
    # /proc counts CPU in clock ticks: tiny runs may read 0, but never all of them.
    assert sum(float(s) for *_, s in writes + reads) > 0
