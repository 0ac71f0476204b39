"""The processes of a local Ray node this driver started (``pipeline.runtime.ray_seam`` hands them over as plain
process objects and pids, so only the seam imports ray): the environment they start with, the guardian that stops
them if the driver is killed, and a fast stop at a normal exit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ inside (for the processes started there), the caller's own environment after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_guardian(pids: list[int]) -> None:
    """This driver started the node: start ``pipeline.runtime.guardian`` to stop it if the driver is killed."""
    targets = []
    for pid in pids:
        try:
            targets.append(f"{pid}:{psutil.Process(pid).create_time()}")
        except psutil.Error:
            pass
    subprocess.Popen([sys.executable, "-m", "pipeline.runtime.guardian", str(os.getpid()), *targets],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": _package_root()})


def _package_root() -> str:
    return os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            os.environ.get("PYTHONPATH", "")])


def stop(procs: dict[str, list[Any]]) -> None:
    """The autoscaler monitor is killed outright: on one local node it has nothing to scale or clean up, and its
    SIGTERM handler only posts an "autoscaler failed" error to drivers, taking a second. Then the raylet, given 5 s
    after SIGTERM: it stops its workers and leaves the GCS (SIGTERM to both at once leaves each waiting on the
    other). Then every other process together, given 5 s (GCS, dashboard and log monitor take well under 0.1 s)."""
    for p in procs.get("monitor", []):
        if p.poll() is None:
            p.kill()
            p.wait()
    _terminate(procs.get("raylet", []), 5.0)
    _terminate([p for kind, ps in procs.items() if kind not in ("monitor", "raylet") for p in ps], 5.0)


def _terminate(procs: list[Any], grace_s: float) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
