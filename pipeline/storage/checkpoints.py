"""The checkpoint commit protocol, shared by every trainer (the dVAE and both priors).

A checkpoint is a folder ``step{N:08d}`` that an engine fills; it counts only once ``complete.json`` (the step, the
rank count and every file's size, written after all ranks finished) and then the ``latest_complete`` pointer are
written, the same rule as a shard's marker. DeepSpeed's own ``latest`` file is not used: it is written before the
ranks finish. Resume trusts only the pointer; a folder whose complete checkpoints lost their pointer is refused
rather than silently trained from scratch, and interrupted saves (no ``complete.json``) are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from pipeline.errors import CheckpointError
from pipeline.storage.commit import write_text

POINTER = "latest_complete"
RECORD = "complete.json"
RESUME_POLICIES = ("auto", "require", "never")
_TAG = re.compile(r"^step\d{8}$")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


class Checkpoints:
    """The checkpoints of one output folder (a local path: DeepSpeed writes and reads checkpoint folders there)."""

    def __init__(self, folder: str, prefix: str = "[train]"):
        self.folder, self.prefix = folder, prefix

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def tags(self) -> list[str]:
        """Every checkpoint folder, complete or not, oldest first."""
        if not os.path.isdir(self.folder):
            return []
        return sorted(n for n in os.listdir(self.folder) if _TAG.match(n) and os.path.isdir(self.path(n)))

    def complete(self) -> list[str]:
        return [t for t in self.tags() if os.path.exists(self.path(t, RECORD))]

    def latest(self) -> str | None:
        """The tag the pointer names; None without a pointer. A pointer to an incomplete folder is an error."""
        path = self.path(POINTER)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            tag = f.read().strip()
        if not os.path.exists(self.path(tag, RECORD)):
            raise CheckpointError(f"{self.folder}: latest_complete names {tag}, which has no complete.json")
        return tag

    def step(self, tag: str) -> int:
        return int(self.verify(tag)["step"])

    def verify(self, tag: str) -> dict[str, Any]:
        """complete.json of ``tag``, after checking every file it lists is there with its recorded size."""
        tag_dir = self.path(tag)
        try:
            with open(os.path.join(tag_dir, RECORD)) as f:
                record = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{tag_dir}/complete.json: unreadable ({exc})") from exc
        for rel, size in record.get("files", {}).items():
            path = os.path.join(tag_dir, rel)
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: missing from checkpoint {tag} (complete.json lists it)")
            if os.path.getsize(path) != size:
                raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes, complete.json recorded {size}; "
                                      "the checkpoint is corrupt or partial")
        return record

    def commit(self, tag: str, step: int, world_size: int) -> None:
        """Rank 0, after every rank's files are written: ``complete.json`` with each file's size, then the pointer."""
        tag_dir = self.path(tag)
        sizes = {os.path.relpath(os.path.join(d, n), tag_dir): os.path.getsize(os.path.join(d, n))
                 for d, _, names in os.walk(tag_dir) for n in names if n != RECORD}
        write_text(os.path.join(tag_dir, RECORD),
                   json.dumps({"step": step, "world_size": world_size, "files": sizes}, sort_keys=True))
        write_text(self.path(POINTER), tag)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` complete checkpoints (0 keeps all), and interrupted saves older than
        the newest complete one."""
        if keep <= 0:
            return []
        latest = self.latest()
        complete = self.complete()
        doomed = complete[:-keep] + [t for t in self.tags() if t not in complete and latest and t < latest]
        for t in doomed:
            shutil.rmtree(self.path(t), ignore_errors=True)
        return doomed

    def drop(self, tags: list[str], why: str) -> None:
        for t in tags:
            print(f"{self.prefix} removing {self.path(t)}: {why}", flush=True)
            shutil.rmtree(self.path(t), ignore_errors=True)

    def clear(self) -> None:
        """Every checkpoint and the pointer (a trainer told to start over)."""
        for t in self.tags():
            shutil.rmtree(self.path(t), ignore_errors=True)
        if os.path.exists(self.path(POINTER)):
            os.remove(self.path(POINTER))

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
