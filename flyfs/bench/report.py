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
