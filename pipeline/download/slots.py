"""A node's connection budget (``download.node_connections``): at most N fetches in flight on one node, shared by
every shard task of the run that node runs.

Why: with a budget per task, the connections a node keeps busy fall whenever a shard is in its tail (waiting on its
last slow URLs) and in the run's last wave (fewer shards left than tasks in flight). With one budget per node, each
task runs as many fetch threads as the whole budget, and each fetch first takes one of the node's N slots: a shard
with little left to fetch leaves its slots to the shards that still have work, so the node stays at N connections
until the run's last URLs.

A slot is an exclusive ``flock`` on one of N empty files in the node's scratch folder (``pipeline.storage.urls``'s
scratch root), so it needs no server, no Ray actor and no shared memory: the kernel hands locks between processes,
and it releases a lock when its descriptor closes, so a shard task that is killed (SIGKILL, OOM) never leaks a slot.
Fetch thread k of every task waits on slot k; a thread opens its slot's file for each fetch and closes it after.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.storage.urls import scratch_root


def slots_folder(output: str, node: str) -> str:
    """The slot files of the run writing ``output``, on the node ``node`` (Ray's node id: simulated nodes on one
    machine share one scratch folder, and each must still get its own budget)."""
    digest = hashlib.sha256(f"{output}\0{node}".encode()).hexdigest()[:16]
    return os.path.join(scratch_root(), "fetch-slots", digest)


class NodeSlots:
    """``count`` slots in ``folder``; ``hold()`` blocks until the calling thread's slot is free, holds it inside."""

    def __init__(self, folder: str, count: int):
        if count < 1:
            raise ValueError(f"a node's connection budget must be >= 1, not {count}")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self.folder, self.count = folder, count
        self._local = threading.local()
        self._next = itertools.count()  # next() on a count is atomic under the GIL: no lock needed

    def _path(self) -> str:
        path = getattr(self._local, "path", None)
        if path is None:  # this thread's slot, fixed for its life: thread k of every task shares slot k
            k = next(self._next) % self.count
            path = self._local.path = os.path.join(self.folder, f"slot-{k:04d}")
        return path

    @contextmanager
    def hold(self) -> Iterator[None]:
        fd = os.open(self._path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks in the kernel, without the GIL
            yield
        finally:
            os.close(fd)  # releases the lock, as a dying process's closed descriptors do
