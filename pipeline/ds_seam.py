"""The DeepSpeed seam: the ds_config built from the typed config, engine set-up, and checkpoints.

Only this module (and jobs/) imports deepspeed. Checkpoints follow the commit protocol: DeepSpeed's own ``latest``
file is not used (it is written before the ranks finish); after a barrier, rank 0 writes ``complete.json`` in the tag
folder and then the ``latest_complete`` pointer. Resume trusts only that pointer and refuses a load that finds nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from pipeline.config import PriorConfig


class CheckpointError(RuntimeError):
    pass


def build_ds_config(cfg: PriorConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """A pure function of the typed config: what DeepSpeed gets, nothing implicit."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,  # the training loop logs its own metrics
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01,
                       # DeepSpeed's fused CPU Adam needs a compiled op; torch's AdamW runs everywhere.
                       "torch_adam": not on_gpu},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": cfg.steps, "warmup_num_steps": min(cfg.warmup_steps, cfg.steps - 1),
                       "cos_min_ratio": 0.1},
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
    }
    if cfg.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


def init_distributed() -> None:
    import deepspeed

    backend = None if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def initialize(model: torch.nn.Module, ds_config: dict[str, Any]):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(engine, folder: str, step: int, client_state: dict[str, Any]) -> str:
    tag = f"step{step:08d}"
    engine.save_checkpoint(folder, tag=tag, client_state=client_state, save_latest=False)
    _barrier()  # every rank's shards are on disk before anything says the checkpoint exists
    if engine.global_rank == 0:
        with open(os.path.join(folder, tag, "complete.json"), "w") as f:
            json.dump({"step": step, "world_size": engine.world_size}, f)
        tmp = os.path.join(folder, "latest_complete.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(folder, "latest_complete"))
    _barrier()
    return tag


def latest_complete(folder: str) -> str | None:
    path = os.path.join(folder, "latest_complete")
    if not os.path.exists(path):
        return None
    tag = open(path).read().strip()
    if not os.path.exists(os.path.join(folder, tag, "complete.json")):
        raise CheckpointError(f"{folder}: latest_complete names {tag}, which has no complete.json")
    return tag


def load_checkpoint(engine, folder: str, tag: str) -> dict[str, Any]:
    path, client_state = engine.load_checkpoint(folder, tag=tag)
    if path is None:  # DeepSpeed returns (None, None) instead of raising
        raise CheckpointError(f"{folder}/{tag}: DeepSpeed found no checkpoint to load")
    return client_state or {}


def consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (None elsewhere), for inference without DeepSpeed."""
    if zero_stage == 3:
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    else:
        state = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    return state if engine.global_rank == 0 else None
