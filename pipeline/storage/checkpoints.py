"""The checkpoint commit protocol, shared by every trainer (the dVAE and both priors).

A checkpoint is a folder ``step{N:08d}`` that an engine fills; it counts only once ``complete.json`` (the step, the
rank count and every file's size, written after all ranks finished) and then the ``latest_complete`` pointer are
written, the same rule as a shard's marker. DeepSpeed's own ``latest`` file is not used: it is written before the
ranks finish. Resume trusts only the pointer; a folder whose complete checkpoints lost their pointer is refused
rather than silently trained from scratch, and interrupted saves (no ``complete.json``) are removed.

The folder is a URL (a local path or object storage). DeepSpeed writes and reads checkpoint folders on a local disk,
so each rank saves into its node-local ``Workspace`` and uploads what it wrote (``upload``); rank 0 commits only
after every rank's upload finished (a barrier between), and a resuming rank downloads the committed tag (``fetch``).
"""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

from pipeline.errors import CheckpointError
from pipeline.storage.commit import fs_and_path, remove, write_text
from pipeline.storage.urls import Workspace, join

POINTER = "latest_complete"
RECORD = "complete.json"
RESUME_POLICIES = ("auto", "require", "never")
_TAG = re.compile(r"^step\d{8}$")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


class Checkpoints:
    """The checkpoints of one output folder (a local path or a URL)."""

    def __init__(self, folder: str, prefix: str = "[train]"):
        self.folder, self.prefix = folder, prefix
        self.fs, self.base = fs_and_path(folder)

    def path(self, *parts: str) -> str:
        return join(self.folder, *parts)

    def _p(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def tags(self) -> list[str]:
        """Every checkpoint folder, complete or not, oldest first."""
        self.fs.invalidate_cache()  # other ranks' and runs' writes: an object store lister caches listings
        if not self.fs.exists(self.base):
            return []
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.base, detail=True)
                 if e.get("type") == "directory"]
        return sorted(n for n in names if _TAG.match(n))

    def complete(self) -> list[str]:
        return [t for t in self.tags() if self.fs.exists(self._p(t, RECORD))]

    def latest(self) -> str | None:
        """The tag the pointer names; None without a pointer. A pointer to an incomplete folder is an error."""
        try:
            tag = self.fs.cat_file(self._p(POINTER)).decode().strip()
        except FileNotFoundError:
            return None
        if not self.fs.exists(self._p(tag, RECORD)):
            raise CheckpointError(f"{self.folder}: latest_complete names {tag}, which has no complete.json")
        return tag

    def step(self, tag: str) -> int:
        return int(self.verify(tag)["step"])

    def record(self, tag: str) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(self._p(tag, RECORD)))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path(tag)}/complete.json: unreadable ({exc})") from exc

    def sizes(self, tag: str) -> dict[str, int]:
        """rel path → size of every file of ``tag`` but complete.json, as storage holds them."""
        root = self._p(tag)
        self.fs.invalidate_cache()
        found = self.fs.find(root, detail=True) if self.fs.exists(root) else {}
        return {name[len(root):].lstrip("/"): int(i["size"]) for name, i in found.items()
                if i.get("type") != "directory" and not name.endswith("/" + RECORD)}

    def verify(self, tag: str) -> dict[str, Any]:
        """complete.json of ``tag``, after checking every file it lists is there with its recorded size."""
        record = self.record(tag)
        have = self.sizes(tag)
        for rel, size in record.get("files", {}).items():
            where = self.path(tag, rel)
            if rel not in have:
                raise CheckpointError(f"{where}: missing from checkpoint {tag} (complete.json lists it)")
            if have[rel] != size:
                raise CheckpointError(f"{where}: {have[rel]} bytes, complete.json recorded {size}; "
                                      "the checkpoint is corrupt or partial")
        return record

    def commit(self, tag: str, step: int, world_size: int) -> None:
        """Rank 0, after every rank's files are in storage: ``complete.json`` with each file's size, then the
        pointer."""
        write_text(self.path(tag, RECORD),
                   json.dumps({"step": step, "world_size": world_size, "files": self.sizes(tag)}, sort_keys=True))
        write_text(self.path(POINTER), tag)

    def upload(self, ws: Workspace, tag: str) -> None:
        """This rank's files of ``tag`` (saved into its workspace) to storage; then the local copy is dropped, as the
        truth is in storage (a node keeps no checkpoint a later step needs)."""
        if ws.remote:
            ws.push(tag)
            ws.discard(tag)

    def fetch(self, ws: Workspace, tag: str) -> str:
        """The committed ``tag`` in this rank's workspace (downloaded when storage is remote); the local folder that
        holds it, for DeepSpeed to load."""
        if ws.remote:
            ws.pull(tag)
        return ws.local

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` complete checkpoints (0 keeps all), and interrupted saves older than
        the newest complete one."""
        if keep <= 0:
            return []
        latest = self.latest()
        complete = self.complete()
        doomed = complete[:-keep] + [t for t in self.tags() if t not in complete and latest and t < latest]
        for t in doomed:
            self._rm(t)
        return doomed

    def _rm(self, tag: str) -> None:
        if "://" in self.folder and not self.folder.startswith("file://"):
            remove(self.fs, self._p(tag), recursive=True)
        else:
            shutil.rmtree(self._p(tag), ignore_errors=True)

    def drop(self, tags: list[str], why: str) -> None:
        for t in tags:
            print(f"{self.prefix} removing {self.path(t)}: {why}", flush=True)
            self._rm(t)

    def clear(self) -> None:
        """Every checkpoint and the pointer (a trainer told to start over)."""
        for t in self.tags():
            self._rm(t)
        remove(self.fs, self._p(POINTER))

    def resume_tag(self, policy: str, key: str, rank: int = 0) -> str | None:
        """The checkpoint to resume under ``policy`` (auto | require | never; ``key`` names the config key in
        messages), or None to start fresh. Refuses before any work when the policy and the folder disagree, and
        on rank 0 removes interrupted saves that could never be resumed."""
        if policy not in RESUME_POLICIES:
            raise ValueError(f"{key}: unknown resume policy {policy!r}")
        tag = self.latest()
        tags, complete = self.tags(), self.complete()
        output_key = key.rsplit(".", 1)[0] + ".output"
        if tag is None and complete:
            raise CheckpointError(f"{self.folder}: complete checkpoint(s) {', '.join(complete)} exist but the "
                                  f"latest_complete pointer is missing; refusing to start from scratch. Restore it "
                                  f"(write '{complete[-1]}' into {self.path(POINTER)}) or train into a new "
                                  f"{output_key}")
        if tag is None:
            if policy == "require":
                raise CheckpointError(f"{self.folder}: no complete checkpoint to resume and {key}=require")
            if rank == 0:
                self.drop(tags, "an interrupted save (no complete.json)")
            return None
        if policy == "never":
            raise CheckpointError(f"{self.folder}: holds checkpoint {tag} and {key}=never; train into a new "
                                  f"{output_key} or set {key}=auto")
        if rank == 0:  # a save that crashed before complete.json left a partial folder past the pointer
            self.drop([t for t in tags if t > tag and t not in complete], "an interrupted save (no complete.json)")
        return tag
