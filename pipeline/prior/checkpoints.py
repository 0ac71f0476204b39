"""Which checkpoint a prior run resumes from, and the consolidated weights it exports.

The policy (``prior.resume``) is applied before any work: a folder that holds complete checkpoints is never silently
trained from scratch, and a checkpoint is resumed only with the data plan and model shape it was written with.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.prior.loader import DataPlan
from pipeline.runtime import ds_seam
from pipeline.runtime.ds_seam import CheckpointError


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


def write_weights(engine, zero_stage: int, shape: Any, meta: dict[str, Any], steps: int, path: str,
                  ema: Any = None) -> None:
    """Consolidated fp32 weights (gathered from ZeRO-3 shards when needed) that load without DeepSpeed; for the
    diffusion prior the EMA weights, which sampling uses."""
    from pipeline.prior.objectives import weights_blob

    state = ds_seam.consolidated_state_dict(engine, zero_stage)
    if state is None:  # not rank 0
        return
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    ema_weights = None if ema is None else with_ema(weights, dict(ema.module.named_buffers()))
    tmp = path + ".tmp"
    torch.save(weights_blob(shape, weights, meta, steps, ema_weights), tmp)
    os.replace(tmp, path)


def export_weights(out: str, tag: str | None = None) -> str:
    """Consolidated fp32 weights of a saved checkpoint (default: the newest complete one) as ``<out>/<tag>/model.pt``,
    loadable by ``pipeline.prior.train.load_prior`` without DeepSpeed or GPUs, ZeRO-sharded or not."""
    tag = tag or ds_seam.latest_complete(out)
    if tag is None:
        raise CheckpointError(f"{out}: no complete checkpoint to export")
    ds_seam.verify_checkpoint(out, tag)
    tag_dir = os.path.join(out, tag)
    try:
        state = json.loads(open(os.path.join(tag_dir, "train_state.json")).read())
        stage = json.loads(open(os.path.join(tag_dir, "ds_config.json")).read())["zero_optimization"]["stage"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{tag_dir}: no readable train_state.json/ds_config.json ({exc})") from exc
    if stage == 0:  # plain data parallel: rank 0's model file holds every weight
        module = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)["module"]
    else:  # ZeRO 1-3: DeepSpeed's own offline consolidation of the fp32 partitions
        module = ds_seam.fp32_state_dict_from_checkpoint(out, tag)
    weights = {k.removeprefix("model."): v.float() for k, v in module.items()}
    blob = {"kind": state.get("kind", "ar"), "shape": state["shape"], "state_dict": weights,
            "tokens_meta": state["data_plan"]["meta"], "steps": state["step"]}
    ema = _saved_ema(tag_dir)
    if ema is not None:  # the diffusion prior samples with its EMA weights
        blob["raw_state_dict"] = weights
        blob["state_dict"] = with_ema(weights, ema)
    path = os.path.join(tag_dir, "model.pt")
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def _saved_ema(tag_dir: str) -> dict[str, torch.Tensor] | None:
    """The EMA buffers a diffusion run saved in its client state (rank 0's model-states file), if any."""
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False).get("ema")


def with_ema(weights: dict[str, torch.Tensor], ema_buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with each parameter replaced by its fp32 EMA (EMA buffers are named like the parameter, '.' → '__');
    the model's own buffers stay as they are."""
    return {k: ema_buffers.get(k.replace(".", "__"), v).float().cpu() for k, v in weights.items()}
