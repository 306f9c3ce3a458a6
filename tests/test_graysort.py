"""valsort-style validation and the two-phase GraySort on a local directory."""

import io
import os
import threading
import zlib

import numpy as np
import pytest

from flyfs.bench import graysort, gensort, valsort
from flyfs.bench.graysort import LocalFS, run_graysort
from flyfs.bench.valsort import Summary, combine, summarize


def ref_valsort(data: bytes) -> dict:
    """valsort.c's summarize_records, transcribed as a plain loop."""
    recs = [data[i:i + 100] for i in range(0, len(data), 100)]
    out = dict(records=len(recs), checksum=sum(zlib.crc32(r) for r in recs),
               duplicates=0, unordered=0, first_unordered=None)
    for i in range(1, len(recs)):
        a, b = recs[i - 1][:10], recs[i][:10]
        if a == b:
            out["duplicates"] += 1
        elif a > b:
            if out["first_unordered"] is None:
                out["first_unordered"] = i
            out["unordered"] += 1
    return out


def fields(s: Summary) -> dict:
    return dict(records=s.records, checksum=s.checksum, duplicates=s.duplicates,
                unordered=s.unordered, first_unordered=s.first_unordered)


def records_with_keys(keys: list[bytes], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    recs = rng.integers(0, 256, (len(keys), 100), dtype=np.uint8)
    for i, k in enumerate(keys):
        recs[i, :10] = np.frombuffer(k, np.uint8)
    return recs


def small_alphabet_keys(n: int, seed: int) -> list[bytes]:
    """Keys from a tiny alphabet: many duplicates and many shared 8-byte prefixes."""
    rng = np.random.default_rng(seed)
    return [bytes(rng.choice([0, 1, 255], size=10).astype(np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------ valsort


def test_sorted_gensort_data_validates():
    recs = gensort.generate(1000, 5000)
    s = summarize(graysort.sort_records(recs))
    assert s.ordered and s.records == 5000 and s.duplicates == 0
    assert s.checksum == valsort.checksum(recs)
    assert s.first_key == min(r[:10].tobytes() for r in recs)
    assert s.last_key == max(r[:10].tobytes() for r in recs)


@pytest.mark.parametrize("seed", range(4))
def test_summary_matches_reference_loop(seed):
    recs = records_with_keys(small_alphabet_keys(400, seed), seed)
    for block in (recs, graysort.sort_records(recs)):
        assert fields(summarize(block)) == ref_valsort(block.tobytes())


def test_detects_unsorted_and_duplicates():
    keys = [b"a" * 10, b"b" * 10, b"b" * 10, b"a" * 10, b"c" * 10, b"c" * 10, b"c" * 10]
    s = summarize(records_with_keys(keys))
    assert (s.unordered, s.first_unordered, s.duplicates) == (1, 3, 3)
    assert not s.ordered
    # a key differing only in its last byte (the uint16 part) is still out of order
    s = summarize(records_with_keys([b"\x00" * 9 + b"\x02", b"\x00" * 9 + b"\x01"]))
    assert (s.unordered, s.first_unordered) == (1, 1)


@pytest.mark.parametrize("seed", range(3))
def test_combine_across_files_equals_whole(seed):
    recs = records_with_keys(small_alphabet_keys(300, seed + 10), seed)
    for block in (recs, graysort.sort_records(recs)):
        cuts = sorted(np.random.default_rng(seed).choice(np.arange(1, 300), 5, replace=False))
        pieces = np.split(block, cuts)
        total = combine(summarize(p) for p in pieces)
        assert fields(total) == ref_valsort(block.tobytes())
        assert total.first_key == block[0, :10].tobytes()
        assert total.last_key == block[-1, :10].tobytes()


def test_combine_checks_file_boundaries():
    a = summarize(records_with_keys([b"a" * 10, b"m" * 10]))
    b = summarize(records_with_keys([b"m" * 10, b"z" * 10]))
    c = summarize(records_with_keys([b"b" * 10, b"c" * 10]))
    ab = combine([a, b])
    assert ab.ordered and ab.duplicates == 1 and ab.records == 4
    abc = combine([a, b, c])
    assert abc.unordered == 1 and abc.first_unordered == 4
    assert combine([a, Summary(), b]) == ab  # empty files do not break the chain
    assert combine([]) == Summary()


def test_wrong_count_and_partial_record():
    recs = graysort.sort_records(gensort.generate(0, 1000))
    full = valsort.summarize_file(io.BytesIO(recs.tobytes()), chunk_records=64)
    short = valsort.summarize_file(io.BytesIO(recs[:-1].tobytes()), chunk_records=64)
    assert full == summarize(recs)
    assert short.records == 999 and short.checksum != full.checksum
    with pytest.raises(ValueError, match="partial record"):
        valsort.summarize_file(io.BytesIO(recs.tobytes()[:-1]))


def test_summary_serialization():
    s = summarize(records_with_keys([b"b" * 10, b"a" * 10, b"a" * 10]))
    assert Summary.from_bytes(s.to_bytes()) == s
    assert Summary.from_bytes(Summary().to_bytes()) == Summary()
    for bad in (b"", b"[]", b'{"records": 1}', b"\xff"):
        with pytest.raises(ValueError, match="bad summary"):
            Summary.from_bytes(bad)


def test_checksum_wraps_at_128_bits():
    big = Summary(records=1, checksum=(1 << 128) - 1, first_key=b"a" * 10, last_key=b"a" * 10)
    one = Summary(records=1, checksum=2, first_key=b"b" * 10, last_key=b"b" * 10)
    assert (big + one).checksum == 1


# ------------------------------------------------------------ sort helpers


def test_sort_records_full_key_order():
    # shared 8-byte prefixes force the full-key path; compare with Python's sort
    keys = small_alphabet_keys(2000, 3) + [bytes(8) + b"\x00\x05", bytes(8) + b"\x00\x01"]
    recs = records_with_keys(keys, 5)
    out = graysort.sort_records(recs)
    assert sorted(r[:10].tobytes() for r in recs) == [r[:10].tobytes() for r in out]
    assert sorted(r.tobytes() for r in recs) == sorted(r.tobytes() for r in out)


def test_partitions_are_key_ranges():
    recs = gensort.generate(0, 20000)
    for parts in (1, 3, 8, 70000):
        pid = graysort.partition_of(recs, parts)
        assert pid.min() >= 0 and pid.max() < parts
        order = np.argsort([r[:10].tobytes() for r in recs], kind="stable")
        assert np.all(np.diff(pid[order].astype(np.int64)) >= 0)  # monotone in the key
    grouped, off = graysort.split_by_partition(recs, 8)
    counts = np.diff(off)
    assert counts.sum() == 20000 and counts.min() > 2000  # uniform keys, balanced
    for p in range(8):
        assert np.all(graysort.partition_of(grouped[off[p]:off[p + 1]], 8) == p)


def test_localfs_stays_under_root(tmp_path):
    fs = LocalFS(str(tmp_path / "root"))
    fs.makedirs("/a/b")
    with fs.open("/../../a/b/f", "wb") as f:
        f.write(b"xyz")
    assert (tmp_path / "root" / "a" / "b" / "f").read_bytes() == b"xyz"
    assert fs.listdir("/a/b") == ["f"] and fs.size("/a/b/f") == 3
    assert isinstance(fs, graysort.FS)
    with pytest.raises(ValueError, match="binary"):
        fs.open("/a/b/f", "r")


# -------------------------------------------------------------- end to end


def read_outputs(root, partitions) -> np.ndarray:
    parts = [np.fromfile(os.path.join(root, "graysort", "output", "part-%05d" % p), np.uint8)
             for p in range(partitions)]
    return np.concatenate(parts).reshape(-1, 100)


def test_graysort_end_to_end(tmp_path):
    n, parts = 200_000, 4
    events = []
    res = run_graysort(LocalFS(str(tmp_path)), n, parts, 2, keep=True,
                       progress=lambda ph, d, t: events.append((ph, d, t)))
    assert res.ok, res.errors
    assert res.summary.records == n and res.summary.ordered
    expected = gensort.generate(0, n)
    assert res.input_checksum == valsort.checksum(expected) == res.summary.checksum
    out = read_outputs(tmp_path, parts)
    # output is exactly the input records, in key order (checked without our sort)
    assert sorted(r.tobytes() for r in expected) == [r.tobytes() for r in out]
    for ph, total in (("gen", 2), ("phase1", 2), ("phase2", parts), ("validate", parts)):
        assert (ph, total, total) in events
    assert set(res.times) >= {"gen", "phase1", "phase2", "validate"}
    assert res.bytes_per_min > 0 and res.records_per_s > 0
    base = tmp_path / "graysort"
    assert sorted(os.listdir(base / "input")) == ["in-00000", "in-00001"]
    assert len(os.listdir(base / "tmp")) == 2 * parts
    sums = [Summary.from_bytes((base / "output" / ("part-%05d.sum" % p)).read_bytes())
            for p in range(parts)]
    assert combine(sums) == res.summary

    # again without keep: same result, input and intermediates removed
    res2 = run_graysort(LocalFS(str(tmp_path)), n, parts, 2)
    assert res2.ok and res2.summary == res.summary
    assert not (base / "input").exists() and not (base / "tmp").exists()
    assert np.array_equal(read_outputs(tmp_path, parts), out)


class FlipFirstByte:
    """File wrapper that inverts the first byte written through it."""

    def __init__(self, f):
        self.f = f
        self.first = True

    def write(self, data):
        if self.first and len(data):
            self.first = False
            b = bytearray(data)
            b[0] ^= 0xFF
            return self.f.write(bytes(b))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class CorruptingFS(LocalFS):
    """A broken sorter: one output file gets its first byte flipped."""

    def open(self, path, mode="rb"):
        f = super().open(path, mode)
        if path.endswith("/output/part-00001") and "w" in mode:
            return FlipFirstByte(f)
        return f


def test_graysort_detects_corrupt_output(tmp_path):
    res = run_graysort(CorruptingFS(str(tmp_path)), 30_000, 3, 2)
    assert not res.ok
    assert any("checksum" in e for e in res.errors)
    assert any("unordered" in e for e in res.errors)


def test_graysort_more_partitions_than_records(tmp_path):
    res = run_graysort(LocalFS(str(tmp_path)), 5, 16, 1)
    assert res.ok, res.errors
    assert res.summary.records == 5


def test_bad_parameters(tmp_path):
    for kw in (dict(records=0), dict(partitions=0), dict(workers=0)):
        args = dict(records=10, partitions=2, workers=1) | kw
        with pytest.raises(ValueError, match="at least 1"):
            run_graysort(LocalFS(str(tmp_path)), **args)


def test_cli(tmp_path, capsys):
    rc = graysort.main(["--records", "20k", "--partitions", "2", "--workers", "1",
                        "--local", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "records=20,000" in out and "[phase2] 2/2 done" in out
    assert "validation               OK" in out
    assert "output checksum" in out


def test_wait_quiet_waits_while_the_cpus_are_busy(tmp_path):
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass
    t = threading.Thread(target=spin)
    t.start()
    try:   # one core always busy, above the threshold asked: never quiet, so it waits it out
        assert graysort.wait_quiet(str(tmp_path / "not-yet"), timeout=1.5,
                                   busy=0.5 / (os.cpu_count() or 1)) >= 1.5
    finally:
        stop.set()
        t.join()
