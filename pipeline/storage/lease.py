"""One writer per run folder: a lease object created atomically, kept alive by a heartbeat, checked before commits.

Why: two runs into one folder planned the same shards, deleted each other's staging and plans, and fetched URLs
twice. A stage now holds ``<folder>/_lease/<generation>.json`` while it writes there (owner, host, pid, Ray job id,
start, heartbeat). A second run is refused at once naming the holder; a lease whose holder is dead (same host and its
pid is gone) or silent (no heartbeat for ``ttl_s``) is taken over by creating the *next* generation, so two runs
racing for a stale lease cannot both win: exactly one exclusive create of generation n+1 succeeds.

Exclusive create: locally ``link(2)`` of a fully written temporary file (it fails if the name exists, and a reader
never sees a half-written lease); on S3 a conditional PUT (``If-None-Match: *``, s3fs ``mode="create"``), which
moto's server and AWS refuse with 412 when the object exists. Tasks check a ``LeaseToken`` before they commit, so an
orphaned task of a dead or superseded run commits nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError
from pipeline.storage.commit import _is_local, fs_and_path, remove

log = logging.getLogger(__name__)

FOLDER = "_lease"
TTL_S = 60.0  # a holder that has not beaten for this long is presumed gone (its lease can be taken over)
HEARTBEAT_S = 10.0


class LeaseHeldError(PipelineError, RuntimeError):
    """Another run holds the output folder's lease."""


class LeaseLostError(PipelineError, RuntimeError):
    """This run's lease was taken over or went stale: it must not commit anything more."""


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class LeaseToken:
    """What a task needs to check that its run still owns the folder (picklable, no thread, no handle)."""
    folder: str
    generation: int
    lease_id: str
    ttl_s: float = TTL_S

    def check(self) -> None:
        """Raise ``LeaseLostError`` unless this lease is still the newest generation and alive."""
        fs, path = fs_and_path(self.folder)
        gens = _generations(fs, path)
        if not gens or gens[-1] != self.generation:
            raise LeaseLostError(f"{self.folder}: this run's lease (generation {self.generation}) was taken over "
                                 f"(newest is {gens[-1] if gens else 'none'}); not committing")
        doc = _read(fs, path, self.generation)
        if doc is None or doc.get("id") != self.lease_id:
            raise LeaseLostError(f"{self.folder}: this run's lease is gone; not committing")
        if doc.get("released"):
            raise LeaseLostError(f"{self.folder}: this run's lease was released (its driver finished or stopped)")
        if _now() - float(doc.get("heartbeat", 0)) > self.ttl_s:
            raise LeaseLostError(f"{self.folder}: this run's lease has had no heartbeat for over {self.ttl_s:.0f} s "
                                 "(its driver died?); not committing")


def _generations(fs: Any, path: str) -> list[int]:
    folder = f"{path}/{FOLDER}"
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _gen_path(path: str, gen: int) -> str:
    return f"{path}/{FOLDER}/{gen:06d}.json"


def _read(fs: Any, path: str, gen: int) -> dict[str, Any] | None:
    # One whole-object GET (cat_file), not open()+read(): s3fs's open pins the ETag it saw first, so a heartbeat
    # rewriting the lease between its HEAD and its GET failed a task's commit check with PreconditionFailed.
    for attempt in range(3):
        try:
            return json.loads(fs.cat_file(_gen_path(path, gen)))
        except (FileNotFoundError, ValueError):
            return None
        except OSError:  # s3fs's FileExpired and kin: the object changed under the read; read it again
            if attempt == 2:
                raise
            time.sleep(0.1)
    return None


def _create_exclusive(fs: Any, target: str, data: bytes) -> bool:
    """Create ``target`` with ``data`` only if it does not exist; False when it already did."""
    if _is_local(fs):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.new"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:  # link(2) is the exclusive create here: it fails if the name exists, and the file appears whole
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
        return True
    try:
        fs.pipe_file(target, data, mode="create")  # S3: If-None-Match: *; s3fs turns the 412 into FileExistsError
    except FileExistsError:
        return False
    return True


def _holder_alive(doc: dict[str, Any], ttl_s: float) -> bool:
    if doc.get("released"):
        return False
    if doc.get("host") == socket.gethostname():  # same machine: the pid tells at once
        try:
            os.kill(int(doc["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive, someone else's
    return _now() - float(doc.get("heartbeat", 0)) <= ttl_s


def describe(doc: dict[str, Any]) -> str:
    age = _now() - float(doc.get("heartbeat", 0))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(doc.get("started", 0))))
    job = f", Ray job {doc['job_id']}" if doc.get("job_id") else ""
    return (f"{doc.get('stage')} run {doc.get('id')} (host {doc.get('host')}, pid {doc.get('pid')}{job}) since "
            f"{started}, last heartbeat {age:.0f} s ago")


class Lease:
    """The lease of one run on ``folder``: ``with Lease(folder, stage) as lease:`` around everything the run writes."""

    def __init__(self, folder: str, stage: str, ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S):
        self.folder, self.stage, self.ttl_s, self.heartbeat_s = folder, stage, ttl_s, heartbeat_s
        self.fs, self.path = fs_and_path(folder)
        self.id = uuid.uuid4().hex[:12]
        self.generation = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._doc: dict[str, Any] = {}

    @property
    def token(self) -> LeaseToken:
        return LeaseToken(self.folder, self.generation, self.id, self.ttl_s)

    def acquire(self) -> Lease:
        gens = _generations(self.fs, self.path)
        gen = 0
        if gens:
            top = gens[-1]
            doc = _read(self.fs, self.path, top)
            if doc is None:  # listed but unreadable: another run is creating it this instant
                raise LeaseHeldError(f"{self.folder}: another run is taking the lease right now; refusing to start")
            if _holder_alive(doc, self.ttl_s):
                raise LeaseHeldError(f"{self.folder} is being written by {describe(doc)}; refusing to start a "
                                     f"second {self.stage} into it. Wait for it to finish or stop it (a dead holder's "
                                     f"lease is taken over after {self.ttl_s:.0f} s without heartbeat)")
            if not doc.get("released"):
                log.warning("%s: taking over the lease of %s (its holder is gone)", self.folder, describe(doc))
            gen = top + 1
        now = _now()
        self._doc = {"id": self.id, "stage": self.stage, "host": socket.gethostname(), "pid": os.getpid(),
                     "job_id": os.environ.get("RAY_JOB_ID", ""), "started": now, "heartbeat": now}
        if not _create_exclusive(self.fs, _gen_path(self.path, gen), json.dumps(self._doc).encode()):
            doc = _read(self.fs, self.path, gen) or {}
            raise LeaseHeldError(f"{self.folder}: another run took the lease first: {describe(doc)}")
        self.generation = gen
        for old in gens:  # superseded generations: only the newest one counts
            self._remove(old)
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{self.stage}")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                gens = _generations(self.fs, self.path)
                if not gens or gens[-1] != self.generation:
                    log.error("%s: lease generation %d was taken over; this run's tasks will not commit",
                              self.folder, self.generation)
                    return
                self._doc["heartbeat"] = _now()
                self.fs.pipe_file(_gen_path(self.path, self.generation), json.dumps(self._doc).encode())
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the TTL is several beats long
                log.warning("%s: lease heartbeat failed (%s)", self.folder, exc)

    def _remove(self, gen: int) -> None:
        remove(self.fs, _gen_path(self.path, gen))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.generation >= 0 and _generations(self.fs, self.path)[-1:] == [self.generation]:
            self._remove(self.generation)
        self.generation = -1

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
