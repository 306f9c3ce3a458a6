"""gensort 1.5 record generator, vectorized with numpy.

Produces byte for byte what ``gensort`` 1.5 (Chris Nyberg, sortbenchmark.org)
writes in its default binary mode (no ``-a``, no ``-s``).

The algorithm, as in gensort.c / rand16.c:

* a 128-bit linear congruential generator
  ``x' = (A * x + C) mod 2**128`` starting from ``x = 0``; record ``r``
  uses the states ``x_{r+1} .. x_{r+10}`` (``x_k`` = the k-th step from 0;
  gensort skips ahead to ``x_r`` in O(log r) with precomputed powers of the
  generator and keeps a ten-deep queue of states);
* record ``r`` is ten 10-byte parts: part ``k`` is the high 10 bytes (big
  endian: all of the high 64 bits, then the top 16 of the low 64) of
  ``x_{r+1+k} XOR K_k``, where ``K_0 = 0`` (so the key is the plain top of
  ``x_{r+1}``) and ``K_1 .. K_9`` are fixed constants.

(Older gensort 1.2 wrote a different binary record: key, 0x00 0x11, the record
number in hex, 0x88 0x99 0xAA 0xBB, hex filler, 0xCC 0xDD 0xEE 0xFF. Since 1.3
every byte of a binary record is pseudo-random; :func:`generate` follows 1.5.)

Here the 128-bit arithmetic runs as two uint64 halves: a block of states is
``x_{b+j} = A_j * x_b + C_j`` for a cached table of ``f**j`` coefficients, so
a block costs one vectorized 128x128-bit multiply-add whatever ``start`` is.
"""

from __future__ import annotations

import numpy as np

from flyfs.bench import valsort

__all__ = [
    "RECORD_SIZE",
    "KEY_SIZE",
    "MAX_RECORD",
    "LCG_A",
    "LCG_C",
    "lcg_power",
    "skip_ahead",
    "generate",
    "generate_into",
    "record_checksum",
]

RECORD_SIZE = 100
KEY_SIZE = 10
MAX_RECORD = 1 << 128  # record numbers are 128-bit, as in gensort

LCG_A = 0x2360ED051FC65DA44385DF649FCCF645
LCG_C = 0x4A696D47726179524950202020202001
_MASK128 = (1 << 128) - 1
_MASK64 = (1 << 64) - 1

# XOR constants of the ten 10-byte parts of a binary record (gen_rec in
# gensort.c); part 0 is the key and is not XORed.
_PART_XOR = (
    (0x0000000000000000, 0x0000),
    (0xF0E8E4E2E1D8D4D2, 0xD1CC),
    (0xCAC9C6C5C3B8B4B2, 0xB1AC),
    (0xAAA9A6A5A39C9A99, 0x9695),
    (0x938E8D8B87787472, 0x716C),
    (0x6A696665635C5A59, 0x5655),
    (0x534E4D4B473C3A39, 0x3635),
    (0x332E2D2B271E1D1B, 0x170F),
    (0xC8C4C2C198949291, 0x8CE0),
    (0x170F332E2D2B271E, 0x1D1B),
)
_PART_XOR_BYTES = np.frombuffer(
    b"".join(h.to_bytes(8, "big") + l.to_bytes(2, "big") for h, l in _PART_XOR),
    dtype=np.uint8,
).reshape(10, 10)

_PART_XOR_ROW = _PART_XOR_BYTES.reshape(RECORD_SIZE)
_PAIR_XOR_WORDS = np.tile(_PART_XOR_ROW, 2).view(np.uint64)

_BLOCK = 1 << 16  # states per vectorized multiply-add
_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


def _compose(f: tuple[int, int], g: tuple[int, int]) -> tuple[int, int]:
    """Affine map ``g(f(x))`` for maps given as (a, c) meaning ``a*x + c``."""
    return (f[0] * g[0]) & _MASK128, (g[0] * f[1] + g[1]) & _MASK128


# _POW2[i] = coefficients of f**(2**i); identical to rand16.c's Gen[] table.
_POW2: list[tuple[int, int]] = [(LCG_A, LCG_C)]
for _ in range(127):
    _POW2.append(_compose(_POW2[-1], _POW2[-1]))


def lcg_power(n: int) -> tuple[int, int]:
    """(a, c) such that ``f**n(x) = (a*x + c) mod 2**128``, in O(log n)."""
    if n < 0:
        raise ValueError(f"negative step count {n}")
    a, c = 1, 0
    i = 0
    n &= _MASK128  # the generator has period 2**128
    while n:
        if n & 1:
            a, c = _compose((a, c), _POW2[i])
        n >>= 1
        i += 1
    return a, c


def skip_ahead(n: int) -> int:
    """The generator state ``n`` steps from 0 (gensort's skip_ahead_rand)."""
    return lcg_power(n)[1]


def _split(v: int) -> tuple[np.uint64, np.uint64]:
    return np.uint64(v >> 64), np.uint64(v & _MASK64)


_table: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


def _step_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a_hi, a_lo, c_hi, c_lo) of f**j for j in [0, _BLOCK), built by doubling."""
    global _table
    if _table is None:
        a_hi = np.empty(_BLOCK, np.uint64)
        a_lo = np.empty(_BLOCK, np.uint64)
        c_hi = np.empty(_BLOCK, np.uint64)
        c_lo = np.empty(_BLOCK, np.uint64)
        a_hi[0], a_lo[0], c_hi[0], c_lo[0] = 0, 1, 0, 0
        k, i = 1, 0
        while k < _BLOCK:
            # f**(k+j) = f**k o f**j: a = a_j * a_k, c = a_k * c_j + c_k
            ak, ck = _POW2[i]
            a_hi[k:2 * k], a_lo[k:2 * k] = _muladd(a_hi[:k], a_lo[:k], ak, 0)
            c_hi[k:2 * k], c_lo[k:2 * k] = _muladd(c_hi[:k], c_lo[:k], ak, ck)
            k *= 2
            i += 1
        _table = (a_hi, a_lo, c_hi, c_lo)
    return _table


def _mulhi64(v: np.ndarray, s: int) -> np.ndarray:
    """High 64 bits of the 128-bit products ``v * s`` (s a 64-bit scalar)."""
    s0, s1 = np.uint64(s & 0xFFFFFFFF), np.uint64(s >> 32)
    v0 = v & _M32
    v1 = v >> _S32
    p00 = v0 * s0
    p01 = v0 * s1
    p10 = v1 * s0
    p11 = v1 * s1
    mid = (p00 >> _S32) + (p01 & _M32) + (p10 & _M32)
    p11 += p01 >> _S32
    p11 += p10 >> _S32
    p11 += mid >> _S32
    return p11


def _muladd(vh: np.ndarray, vl: np.ndarray, s: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """``(v * s + c) mod 2**128`` elementwise; v as uint64 halves, s and c ints."""
    sh, sl = _split(s)
    ch, cl = _split(c)
    with np.errstate(over="ignore"):
        hi = _mulhi64(vl, int(sl))
        hi += vh * sl
        hi += vl * sh
        lo = vl * sl
        lo += cl
        hi += ch
        hi += (lo < cl).astype(np.uint64)  # carry out of the low half
    return hi, lo


def _vec_muladd(ah: np.ndarray, al: np.ndarray, x: int,
                ch: np.ndarray, cl: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(a_j * x + c_j) mod 2**128`` for j < n: table vectors times scalar x."""
    hi, lo = _muladd(ah[:n], al[:n], x, 0)
    with np.errstate(over="ignore"):
        lo += cl[:n]
        hi += ch[:n]
        hi += (lo < cl[:n]).astype(np.uint64)
    return hi, lo


def _states_top10(first: int, count: int) -> np.ndarray:
    """High 10 bytes of states ``x_first .. x_{first+count-1}``, shape (count, 10)."""
    ah, al, ch, cl = _step_table()
    out = np.empty((count, 10), np.uint8)
    x = skip_ahead(first)
    jump = lcg_power(_BLOCK)
    done = 0
    while done < count:
        n = min(_BLOCK, count - done)
        hi, lo = _vec_muladd(ah, al, x, ch, cl, n)
        out[done:done + n, :8] = hi.astype(">u8").view(np.uint8).reshape(n, 8)
        out[done:done + n, 8:] = (lo >> np.uint64(48)).astype(">u2").view(np.uint8).reshape(n, 2)
        x = (jump[0] * x + jump[1]) & _MASK128
        done += n
    return out


def _check_range(start: int, count: int) -> None:
    if count < 0:
        raise ValueError(f"negative record count {count}")
    if start < 0 or start + count > MAX_RECORD:
        raise ValueError(f"record range [{start}, {start + count}) outside [0, 2**128)")


def generate_into(out: np.ndarray, start: int) -> np.ndarray:
    """Fill ``out`` (shape (n, 100), uint8) with records ``start .. start+n-1``."""
    if out.ndim != 2 or out.shape[1] != RECORD_SIZE or out.dtype != np.uint8:
        raise ValueError(f"output must be an (n, {RECORD_SIZE}) uint8 array, got {out.shape} {out.dtype}")
    count = out.shape[0]
    _check_range(start, count)
    if count == 0:
        return out
    top = _states_top10(start + 1, count + 9)
    # Ten row-block copies (memcpy-like), then one XOR with the part
    # constants done 64 bits at a time over pairs of records (200 bytes =
    # 25 words): much faster than ten XORs into 10-byte strided slices.
    for k in range(10):
        out[:, 10 * k:10 * k + 10] = top[k:k + count]
    pairs = count // 2
    if pairs and out.flags.c_contiguous:
        words = out[:2 * pairs].reshape(-1).view(np.uint64).reshape(pairs, 25)
        np.bitwise_xor(words, _PAIR_XOR_WORDS, out=words)
        rest = out[2 * pairs:]
    else:
        rest = out
    np.bitwise_xor(rest, _PART_XOR_ROW, out=rest)
    return out


def generate(start: int, count: int) -> np.ndarray:
    """Records ``start .. start+count-1`` as an array of shape (count, 100), uint8."""
    _check_range(start, count)
    return generate_into(np.empty((count, RECORD_SIZE), np.uint8), start)


def record_checksum(records: np.ndarray) -> int:
    """gensort ``-c`` / valsort checksum: sum of zlib crc32 of each record.

    Computed by :func:`flyfs.bench.valsort.checksum` (vectorized CRC-32).
    """
    return valsort.checksum(records)

