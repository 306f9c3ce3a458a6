"""gensort generator: the numpy version against a plain transcription of the C code."""

import zlib

import numpy as np
import pytest

from flyfs.bench import gensort, valsort

# ---------------------------------------------------------------------------
# Reference: gensort 1.5 rand16.c / gensort.c transcribed line by line with
# Python ints (u16 = (hi8, lo8) pairs of 64-bit words), deliberately slow and
# sharing no code with flyfs.bench.gensort.

U8 = (1 << 64) - 1


def add16(a, b):
    lo = (a[1] + b[1]) & U8
    carry = 1 if lo < a[1] else 0
    return ((a[0] + b[0] + carry) & U8, lo)


def mult16(a, b):
    full = ((a[0] << 64) | a[1]) * ((b[0] << 64) | b[1])
    return ((full >> 64) & U8, full & U8)


def _gen_table():
    # "All structs after the first contain an a and c that comprise the square
    # of the previous function": f(f(x)) = a*(a*x + c) + c.
    table = [((0x2360ED051FC65DA4, 0x4385DF649FCCF645), (0x4A696D4772617952, 0x4950202020202001))]
    for _ in range(127):
        a, c = table[-1]
        table.append((mult16(a, a), add16(mult16(a, c), c)))
    return table


GEN = _gen_table()


def skip_ahead_rand(advance):
    new = (0, 0)
    for word, base in ((advance[1], 0), (advance[0], 64)):
        for i in range(64):
            if word & (1 << i):
                a, c = GEN[i + base]
                new = add16(mult16(new, a), c)
    return new


def next_rand(rand):
    return add16(mult16(rand, GEN[0][0]), GEN[0][1])


XORS = [(0, 0),
        (0xF0E8E4E2E1D8D4D2, 0xD1CC000000000000), (0xCAC9C6C5C3B8B4B2, 0xB1AC000000000000),
        (0xAAA9A6A5A39C9A99, 0x9695000000000000), (0x938E8D8B87787472, 0x716C000000000000),
        (0x6A696665635C5A59, 0x5655000000000000), (0x534E4D4B473C3A39, 0x3635000000000000),
        (0x332E2D2B271E1D1B, 0x170F000000000000), (0xC8C4C2C198949291, 0x8CE0000000000000),
        (0x170F332E2D2B271E, 0x1D1B000000000000)]


class RandQueue:
    def __init__(self, starting_rec_number):
        self.head_index = 0
        self.curr_rec_number = (starting_rec_number >> 64, starting_rec_number & U8)
        self.rand = [next_rand(skip_ahead_rand(self.curr_rec_number))]
        for _ in range(9):
            self.rand.append(next_rand(self.rand[-1]))

    def rq(self, i):
        return self.rand[(self.head_index + i) % 10]

    def bump(self):
        tail = (self.head_index - 1) % 10
        self.rand[self.head_index] = next_rand(self.rand[tail])
        self.head_index = (self.head_index + 1) % 10


def gen_rec(q):
    buf = bytearray(100)
    for k in range(10):
        hi8, lo8 = q.rq(k)
        hi8 ^= XORS[k][0]
        lo8 ^= XORS[k][1]
        for j in range(8):
            buf[10 * k + j] = (hi8 >> (56 - 8 * j)) & 0xFF
        buf[10 * k + 8] = (lo8 >> 56) & 0xFF
        buf[10 * k + 9] = (lo8 >> 48) & 0xFF
    return bytes(buf)


def reference(start, count):
    q = RandQueue(start)
    out = []
    for _ in range(count):
        out.append(gen_rec(q))
        q.bump()
    return out


# ---------------------------------------------------------------------------


def test_reference_table_matches_published_rand16():
    # Entries as printed in rand16.c's Gen[] table.
    assert GEN[1] == ((0x17BCE35BDF69743C, 0x529ED9EB20E0AE99), (0x95E0E48262B3EDFE, 0x04479485C755B646))
    assert GEN[64] == ((0x5F0BA18C53CD8FBC, 0x0000000000000001), (0xF0B1944BFD71A97F, 0))
    assert GEN[127] == ((0, 1), (0x8000000000000000, 0))


def test_lcg_power_is_composition_of_steps():
    x = 0
    for n in range(40):
        assert gensort.skip_ahead(n) == x
        x = (gensort.LCG_A * x + gensort.LCG_C) % (1 << 128)
    for i in (1, 5, 64, 127):
        a, c = GEN[i]
        assert gensort.lcg_power(1 << i) == ((a[0] << 64) | a[1], (c[0] << 64) | c[1])


def test_first_key_is_the_dedication():
    # gensort's first record key is the top of the LCG increment: "JimGrayRIP".
    assert gensort.generate(0, 1)[0, :10].tobytes() == b"JimGrayRIP"
    assert reference(0, 1)[0][:10] == b"JimGrayRIP"


@pytest.mark.parametrize("start", [0, 1, 9, 10, 11, 65535, 65536, 10**9 + 7, 2**40, 2**40 - 1,
                                   2**63, 2**64 - 5, 2**64, 2**100 + 12345, 2**128 - 12])
def test_matches_reference(start):
    count = 12
    got = gensort.generate(start, count)
    assert got.shape == (count, 100) and got.dtype == np.uint8
    assert [r.tobytes() for r in got] == reference(start, count)


def test_matches_reference_across_blocks():
    start, count = 65536 - 700, 66000 + 1400  # spans two internal block boundaries
    got = gensort.generate(start, count)
    ref = reference(start, count)
    assert got.tobytes() == b"".join(ref)


def test_pieces_concatenate():
    whole = gensort.generate(2**64 - 300, 1000)
    parts = [gensort.generate(2**64 - 300 + s, n) for s, n in ((0, 1), (1, 298), (299, 2), (301, 699))]
    assert np.array_equal(np.concatenate(parts), whole)
    buf = np.zeros((7, 100), np.uint8)
    assert gensort.generate_into(buf, 2**64 - 300 + 500) is buf
    assert np.array_equal(buf, whole[500:507])


def test_empty_and_bad_ranges():
    assert gensort.generate(123, 0).shape == (0, 100)
    with pytest.raises(ValueError, match="negative"):
        gensort.generate(0, -1)
    with pytest.raises(ValueError, match="outside"):
        gensort.generate(2**128 - 1, 2)
    with pytest.raises(ValueError, match="outside"):
        gensort.generate(-1, 1)
    with pytest.raises(ValueError, match="uint8"):
        gensort.generate_into(np.zeros((3, 99), np.uint8), 0)


def test_checksum_equals_zlib_sum():
    recs = gensort.generate(5000, 20000)
    data = recs.tobytes()
    crcs = [zlib.crc32(data[i:i + 100]) for i in range(0, len(data), 100)]
    assert valsort.crc32_rows(recs).tolist() == crcs
    assert gensort.record_checksum(recs) == sum(crcs)
    # arbitrary bytes too, not only gensort output
    rnd = np.random.default_rng(7).integers(0, 256, (3000, 100), dtype=np.uint8)
    rd = rnd.tobytes()
    assert valsort.checksum(rnd) == sum(zlib.crc32(rd[i:i + 100]) for i in range(0, len(rd), 100))


def test_ten_million_records_known_checksum():
    """valsort reports 4c4e32cca7d315 and no duplicates for gensort 10000000."""
    n, chunk = 10_000_000, 1 << 20
    buf = np.empty((chunk, 100), np.uint8)
    total = 0
    his, los = [], []
    for s in range(0, n, chunk):
        recs = gensort.generate_into(buf[:min(chunk, n - s)], s)
        total += valsort.checksum(recs)
        hi, lo = valsort.key_parts(recs)
        his.append(hi)
        los.append(lo)
    assert format(total, "x") == "4c4e32cca7d315"
    hi = np.concatenate(his)
    lo = np.concatenate(los)
    hs = np.sort(hi)
    if np.any(hs[1:] == hs[:-1]):  # some keys share 8 bytes: compare full keys
        order = np.lexsort((lo, hi))
        hs, ls = hi[order], lo[order]
        dups = int(np.count_nonzero((hs[1:] == hs[:-1]) & (ls[1:] == ls[:-1])))
    else:
        dups = 0
    assert dups == 0
