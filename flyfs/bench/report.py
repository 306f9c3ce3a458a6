"""Printing helpers shared by the benchmarks: parameters, progress, result table."""
from __future__ import annotations

import sys
import time


def params(title: str, **kw) -> None:
    print(f"== {title}")
    for k, v in kw.items():
        print(f"   {k}: {v}")
    sys.stdout.flush()


def table(rows: list[dict], columns: list[str]) -> None:
    """Print rows (dicts) as an aligned table with the given columns."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


class Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, label: str, total: float):
        self.label, self.total, self.done = label, max(total, 1e-9), 0.0
        self.start = time.monotonic()
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def update(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < (0.2 if self._tty else 5.0) and self.done < self.total:
            return
        self._last = now
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        line = f"{self.label:<24} [{bar:<30}] {frac * 100:5.1f}% {now - self.start:6.1f}s"
        sys.stderr.write(("\r" + line) if self._tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def fmt_rate(x: float, unit: str = "/s") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}{unit}"
    return f"{x:.1f} {unit}"


def fmt_bytes(n: float, unit: str = "B") -> str:
    """Bytes in decimal units: 1.0 GB, 340.2 MB (sortbenchmark.org counts in powers of 1000)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def fmt_seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def fmt_ratio(value: float | None, base: float | None) -> str:
    """value / base as '1.23x', or '' when either is missing or base is 0."""
    if value is None or base is None or base <= 0:
        return ""
    r = value / base
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


class PhaseBars:
    """A `progress(phase, done, total)` callback drawing one Progress bar per phase,
    with an optional `on_phase(phase, seconds)` call as each phase finishes."""

    def __init__(self, prefix: str = "", on_phase=None):
        self.prefix = prefix
        self.on_phase = on_phase
        self._bar: Progress | None = None
        self._phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if done == 0 or phase != self._phase:
            if self._bar is not None:
                self._bar.close()
            self._phase = phase
            self._bar = Progress(f"{self.prefix}{phase}", total)
            if done == 0:
                return
        assert self._bar is not None
        self._bar.update(done - self._bar.done)
        if done >= total:
            self._bar.close()
            if self.on_phase:
                self.on_phase(phase, time.monotonic() - self._bar.start)
            self._bar = None
