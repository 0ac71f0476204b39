"""Stops a driver's local Ray cluster when the driver dies without shutting it down (``kill -9``).

A driver that starts a local cluster (``ray.init()`` without an address) is the parent of Ray's GCS, raylet,
dashboard and runtime-env agents, whose workers run its tasks. Killed hard, it leaves them all running, reparented to
PID 1, and its leftover tasks keep working. The seam starts this guardian in a session of its own; it polls the
driver and, once it is gone, kills the recorded processes and their descendants (matched by start time, so a reused
pid is never touched). A driver that exits normally has already stopped them: the guardian then finds nothing.

    python -m pipeline.runtime.guardian DRIVER_PID PID:START_TIME ...
"""

from __future__ import annotations

import sys
import time

import psutil


def _alive(pid: int, started: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        return proc if abs(proc.create_time() - started) < 1.0 else None
    except psutil.Error:
        return None


def _family(known: dict[int, float]) -> None:
    """Add every live descendant of the known processes (agents and workers start after the cluster does)."""
    for pid, started in list(known.items()):
        proc = _alive(pid, started)
        if proc is None:
            continue
        try:
            for child in proc.children(recursive=True):
                known.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass


def watch(driver: int, driver_started: float, targets: list[tuple[int, float]], poll_s: float = 0.5) -> int:
    """Block while the driver lives, keeping track of the cluster's processes (``targets`` and their descendants);
    then kill every one still running. Returns how many were killed."""
    known = dict(targets)
    while _alive(driver, driver_started) is not None:
        if not any(_alive(p, t) for p, t in targets):
            return 0  # the cluster was shut down normally
        _family(known)
        time.sleep(poll_s)
    _family(known)
    killed = 0
    for pid, started in known.items():
        proc = _alive(pid, started)
        if proc is not None:
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed


def main(argv: list[str]) -> int:
    driver = int(argv[0])
    targets = [(int(p), float(t)) for p, t in (a.split(":", 1) for a in argv[1:])]
    proc = psutil.Process(driver)
    watch(driver, proc.create_time(), targets)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
