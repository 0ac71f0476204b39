"""Which checkpoint a prior run resumes from, and the consolidated weights it exports.

The policy (``prior.resume``) is applied before any work: a folder that holds complete checkpoints is never silently
trained from scratch, and a checkpoint is resumed only with the data plan and model shape it was written with.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline import ds_seam
from pipeline.ds_seam import CheckpointError
from pipeline.prior import PriorShape
from pipeline.prior_data import DataPlan


@dataclass
class ResumePoint:
    tag: str
    plan: DataPlan
    shape: dict[str, Any]
    state: dict[str, Any]


def find_resume(out: str, policy: str, rank: int = 0) -> ResumePoint | None:
    """The newest complete checkpoint of ``out`` to resume, or None to start fresh, as ``policy`` allows."""
    tag = ds_seam.latest_complete(out)
    tags = ds_seam.checkpoint_tags(out)
    complete = [t for t in tags if os.path.exists(os.path.join(out, t, "complete.json"))]
    if tag is None and complete:
        raise CheckpointError(f"{out}: complete checkpoint(s) {', '.join(complete)} exist but the latest_complete "
                              f"pointer is missing; refusing to start from scratch. Restore it (write "
                              f"'{complete[-1]}' into {out}/latest_complete) or train into a new prior.output")
    if tag is None:
        if policy == "require":
            raise CheckpointError(f"{out}: no complete checkpoint to resume and prior.resume=require")
        if rank == 0:
            _drop_partial(out, tags)
        return None
    if policy == "never":
        raise CheckpointError(f"{out}: holds checkpoint {tag} and prior.resume=never; train into a new "
                              "prior.output or set prior.resume=auto")
    path = os.path.join(out, tag, "train_state.json")
    try:
        state = json.loads(open(path).read())
        plan = DataPlan.from_json(state["data_plan"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: unreadable or without a data plan ({exc}); cannot resume exactly") from exc
    if rank == 0:  # a save that crashed before complete.json left a partial folder past the pointer
        _drop_partial(out, [t for t in tags if t > tag and t not in complete])
    return ResumePoint(tag, plan, state["shape"], state)


def _drop_partial(out: str, tags: list[str]) -> None:
    for t in tags:
        print(f"[train-prior] removing {out}/{t}: an interrupted save (no complete.json)", flush=True)
        shutil.rmtree(os.path.join(out, t), ignore_errors=True)


def write_weights(engine, zero_stage: int, shape: PriorShape, meta: dict[str, Any], steps: int, path: str) -> None:
    """Consolidated fp32 weights (gathered from ZeRO-3 shards when needed) that load without DeepSpeed."""
    state = ds_seam.consolidated_state_dict(engine, zero_stage)
    if state is None:  # not rank 0
        return
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    tmp = path + ".tmp"
    torch.save({"shape": asdict(shape), "state_dict": weights, "tokens_meta": meta, "steps": steps}, tmp)
    os.replace(tmp, path)
