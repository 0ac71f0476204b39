"""Periodic progress lines (one line every few seconds), readable in Ray job logs where bars are not."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s summary with its wall-clock seconds added as ``wall_s``."""
    t0 = time.time()
    summary = fn()
    summary["wall_s"] = round(time.time() - t0, 2)
    return summary


class Progress:
    def __init__(self, name: str, total: int, unit: str = "items", every_s: float = 5.0):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.done = 0
        self.t0 = self._last = time.time()

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.time()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            self._print(note)

    def _print(self, note: str = "") -> None:
        rate = self.done / max(self.elapsed, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        extra = f" | {note}" if note else ""
        print(f"[{self.name}] {self.done}/{self.total} {self.unit} ({pct:.0f}%) {rate:.1f} {self.unit}/s "
              f"{self.elapsed:.0f}s{extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.done < self.total:
            self._print("stopped early")
