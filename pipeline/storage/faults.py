"""Crash-test hooks at the points where a crash hurts most: between a shard's files and its marker, inside a
checkpoint save, between two training steps. Unset in normal runs, they cost one environment lookup.

``PIPELINE_FAULT=<where>:<n>[:<rank>][@<once-file>]`` makes the process at that point (``n`` a step or shard id;
rank 0 unless given) exit hard, as a SIGKILL would: no exception handler, no cleanup. With ``@<once-file>`` it fires
only the first time (the file is created before exiting), so a retried task or a rerun passes the same point.
"""

from __future__ import annotations

import os

ENV = "PIPELINE_FAULT"


def fault_point(where: str, n: int, rank: int = 0) -> None:
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    spec, _, once = spec.partition("@")
    parts = spec.split(":")
    if parts[0] != where or int(parts[1]) != n or rank != (int(parts[2]) if len(parts) > 2 else 0):
        return
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # fired already
    print(f"[fault] rank {rank} exits hard at {where}:{n} (pid {os.getpid()})", flush=True)
    os._exit(17)
