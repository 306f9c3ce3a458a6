"""Reusable payload buffers for the data plane.

A fresh ``bytearray(n)`` of a few MiB costs a zero-fill and, for sizes the
allocator maps anew each time, a page fault per 4 KiB when it is first
written: on the storage daemons that was about an eighth of the CPU of a
large write. ``BufferPool.get(n)`` hands out a numpy view of a pooled
power-of-two buffer instead; when the last reference to the view (or to any
memoryview made from it) is gone, a finalizer returns the buffer to the pool.
Nothing has to be released by hand, and a buffer still referenced (a reply
being sent, a payload a handler kept) is never reused. Buffers are
page-aligned, so a payload can go to disk with O_DIRECT as received.
"""
from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np

__all__ = ["BufferPool"]

_MIN = 64 << 10


class BufferPool:
    """Pool of byte buffers, keyed by power-of-two size, at most ``max_pooled`` bytes idle."""

    def __init__(self, max_pooled: int = 256 << 20):
        self.max_pooled = max_pooled
        self._free: dict[int, list[np.ndarray]] = {}
        self._pooled = 0
        self._mu = threading.Lock()  # finalizers may run on any thread

    def get(self, n: int) -> np.ndarray:
        """A writable uint8 array of exactly ``n`` bytes (contents undefined)."""
        size = max(_MIN, 1 << max(n - 1, 1).bit_length())
        with self._mu:
            free = self._free.get(size)
            base = free.pop() if free else None
            if base is not None:
                self._pooled -= size
        if base is None:
            # page-aligned (anonymous mmap), so the storage engine can hand it to O_DIRECT
            base = np.frombuffer(mmap.mmap(-1, size), np.uint8)
        view = base[:n]
        weakref.finalize(view, self._put, base)
        return view

    def _put(self, base: np.ndarray) -> None:
        with self._mu:
            if self._pooled + base.nbytes <= self.max_pooled:
                self._free.setdefault(base.nbytes, []).append(base)
                self._pooled += base.nbytes

    @property
    def pooled_bytes(self) -> int:
        """Bytes held idle for reuse."""
        return self._pooled
