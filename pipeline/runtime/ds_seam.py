"""The DeepSpeed seam: the ds_config built from the typed config, the launcher, engine set-up, the engine's side of
checkpoints (save, load, consolidation), and DeepSpeed's ZeRO-3 memory estimator.

Only this module imports deepspeed. Checkpoints are committed by ``pipeline.storage.checkpoints`` (complete.json and
the ``latest_complete`` pointer after every rank finished); this module only moves state in and out of the engine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from pipeline.config.engine import EngineConfig
from pipeline.errors import CheckpointError, ConfigError, RankError, find_rank_error
from pipeline.storage.checkpoints import Checkpoints, tag_of
from pipeline.storage.faults import fault_point
from pipeline.storage.urls import Workspace

__all__ = ["CheckpointError"]  # raised here; defined with the other user-facing errors


def ds_config(*, micro_batch_size: int, world_size: int, lr: float, steps: int, warmup_steps: int, zero_stage: int,
              bf16: bool, on_gpu: bool, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.01,
              gradient_clipping: float = 1.0, min_lr_ratio: float = 0.1) -> dict[str, Any]:
    """The ds_config of any model we train: AdamW, warm-up then cosine decay to ``min_lr_ratio``, ZeRO, bf16.

    A pure function of its arguments; ``gradient_clipping`` 0 turns clipping off.
    """
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": gradient_clipping,
        "steps_per_print": 10**9,  # the training loop logs its own metrics
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": 1e-8, "weight_decay": weight_decay,
                       # DeepSpeed's fused CPU Adam needs a compiled op; torch's AdamW runs everywhere.
                       "torch_adam": not on_gpu},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            # DeepSpeed refuses a warm-up of 0 steps: at least 1, and never past the last step.
            "params": {"total_num_steps": steps, "warmup_num_steps": max(1, min(warmup_steps, steps - 1)),
                       "cos_min_ratio": min_lr_ratio},
        },
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
    }
    if zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


def build_ds_config(cfg: EngineConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """A prior's or the decoder's ds_config: a pure function of its typed section, then the user's
    ``<section>.ds_config`` JSON on top."""
    # ZeRO partitions state over data-parallel ranks; on one rank without offload it only adds buffer copies
    # (1.2-1.3x step time on CPU, benchmarks/bench_train.py), so a single rank runs plain data parallel.
    single = world_size == 1 and cfg.offload_optimizer == "none" and cfg.offload_param == "none"
    built = ds_config(micro_batch_size=cfg.micro_batch_size, world_size=world_size, lr=cfg.lr, steps=cfg.steps,
                      warmup_steps=cfg.warmup_steps, zero_stage=0 if single else cfg.zero_stage,
                      bf16=cfg.precision == "bf16",
                      on_gpu=on_gpu, weight_decay=cfg.weight_decay, gradient_clipping=cfg.gradient_clipping,
                      min_lr_ratio=cfg.min_lr_ratio)
    gas = cfg.gradient_accumulation_steps
    built["gradient_accumulation_steps"] = gas
    built["train_batch_size"] = cfg.micro_batch_size * world_size * gas
    built["scheduler"] = _schedule(cfg)
    if cfg.precision == "fp16":  # dynamic loss scaling: fp16 gradients underflow without it
        built["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                         "hysteresis": 2, "min_loss_scale": 1}
    zero = built["zero_optimization"]
    for key, device in (("offload_optimizer", cfg.offload_optimizer), ("offload_param", cfg.offload_param)):
        if device != "none":
            zero[key] = {"device": device, "pin_memory": on_gpu}
            if device == "nvme":
                zero[key]["nvme_path"] = cfg.nvme_path
    if cfg.offload_optimizer != "none":  # offloaded steps run DeepSpeed's CPU Adam, not torch's
        built["optimizer"]["params"].pop("torch_adam")
    if built["zero_optimization"]["stage"] in (2, 3):  # overlap gradient reduction with the backward pass
        zero["overlap_comm"] = on_gpu
        zero["contiguous_gradients"] = True
    if not cfg.ds_config:
        return built
    try:
        with open(cfg.ds_config) as f:
            user = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg.SECTION}.ds_config {cfg.ds_config}: not a readable JSON file ({exc})") from exc
    if not isinstance(user, dict):
        raise ConfigError(f"{cfg.SECTION}.ds_config {cfg.ds_config}: top level must be a JSON object")
    return merge(built, user)


def _schedule(cfg: EngineConfig) -> dict[str, Any]:
    """Linear warm-up, then cosine or linear decay to ``min_lr_ratio`` × lr, or constant."""
    # DeepSpeed refuses a warm-up of 0 steps: at least 1, and never past the last step.
    warmup = max(1, min(cfg.warmup_steps, cfg.steps - 1))
    if cfg.lr_schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {"total_num_steps": cfg.steps, "warmup_num_steps": warmup,
                                                     "cos_min_ratio": cfg.min_lr_ratio, "warmup_type": "linear"}}
    if cfg.lr_schedule == "linear":  # DeepSpeed's linear decay ends at warmup_min_lr, where its warm-up starts
        return {"type": "WarmupDecayLR", "params": {"total_num_steps": cfg.steps, "warmup_num_steps": warmup,
                                                    "warmup_min_lr": cfg.lr * cfg.min_lr_ratio,
                                                    "warmup_max_lr": cfg.lr, "warmup_type": "linear"}}
    return {"type": "WarmupLR", "params": {"warmup_num_steps": warmup, "warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr,
                                           "warmup_type": "linear"}}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` applied over ``base``, recursively for nested sections (the user's values win)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def launch(module: str, config_file: str, num_procs: int, log_path: str, echo_prefix: str) -> None:
    """Run ``python -m <module> --config <config_file>`` on ``num_procs`` ranks through the deepspeed launcher.

    CPU ranks (DS_ACCELERATOR=cpu, gloo) where there is no GPU. Every line goes to ``log_path``; lines starting with
    ``echo_prefix`` (rank 0's progress) are echoed to stderr live. A rank that stopped on a user-facing error raises
    that rank's one line (``RankError``); any other failure raises RuntimeError with the log's tail.
    """
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    launcher = str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", str(num_procs), "--master_port", str(port), "--module", module,
           "--config", config_file]
    with open(log_path, "w") as logf:
        logf.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_die_with_parent)
        assert proc.stdout is not None
        tail: list[str] = []
        rank_error = None
        for line in proc.stdout:  # stream rank 0's progress lines live; keep everything in the log
            logf.write(line)
            tail = (tail + [line.rstrip()])[-30:]
            rank_error = rank_error or find_rank_error([line])
            if line.startswith(echo_prefix):
                print(line.rstrip(), file=sys.stderr, flush=True)
        code = proc.wait()
    _remove_shm_buffers(port)
    if code != 0 and rank_error is not None:
        raise RankError(f"{rank_error} (log: {log_path})", rank_error.exit_code)
    if code != 0:
        raise RuntimeError(f"deepspeed launcher exited {code}; log: {log_path}\n" + "\n".join(tail))


def _die_with_parent() -> None:
    """In the launcher's process before exec: SIGTERM it when the driver dies (even by SIGKILL), so its ranks stop
    (DeepSpeed's launcher kills its ranks on SIGTERM) instead of training on, orphaned. Linux's PR_SET_PDEATHSIG."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the ranks' lease check still stops them from committing


def _remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves a ~70 MB shared-memory buffer per rank in /dev/shm named by the master
    port, and never removes it (nor can a killed rank): without this, every run leaks RAM until /dev/shm is full."""
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(path)
        except OSError:
            pass


def init_distributed() -> None:
    import deepspeed

    backend = None if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def initialize(model: torch.nn.Module, ds_config: dict[str, Any]):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        # One rank: DeepSpeed would still flatten, all-reduce and copy back every gradient each step, a pure cost
        # (1.4x a bare loop's step for the small diffusion prior on CPU, benchmarks/bench_train.py).
        engine.enable_backward_allreduce = False
    return engine


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


_after_commit: list[Callable[[str, str, int], None]] = []  # set by the Ray Train seam: report each commit


def on_commit(hook: Callable[[str, str, int], None]) -> None:
    """Call ``hook(folder, tag, step)`` on every rank after each checkpoint commit (Ray Train reports it)."""
    _after_commit[:] = [hook]


def save_checkpoint(engine, ws: Workspace, step: int, client_state: dict[str, Any],
                    rank_state: dict[str, Any] | None = None, files: dict[str, Any] | None = None,
                    keep: int = 0, before_commit: Callable[[], None] = lambda: None) -> str:
    """Save tag ``step{step:08d}`` into this rank's workspace, upload it to the run's storage and commit it
    (``pipeline.storage.checkpoints``) once every rank's upload finished. ``rank_state`` is saved per rank
    (``rank{R}.pt``, e.g. RNG states); ``files`` are JSON files rank 0 writes into the tag (e.g. the ds_config).
    ``keep`` > 0 prunes all but the newest ``keep`` complete checkpoints."""
    ckpts = Checkpoints(ws.url)
    tag = tag_of(step)
    engine.save_checkpoint(ws.local, tag=tag, client_state=client_state, save_latest=False)
    os.makedirs(ws.at(tag), exist_ok=True)  # a rank that holds no engine state (ZeRO 0, rank > 0) wrote nothing
    if rank_state is not None:
        torch.save(rank_state, ws.at(tag, f"rank{engine.global_rank}.pt"))
    if engine.global_rank == 0:
        for name, obj in (files or {}).items():
            with open(ws.at(tag, name), "w") as f:
                f.write(json.dumps(obj, indent=1, sort_keys=True, default=str))
    fault_point("save", step, engine.global_rank)
    ckpts.upload(ws, tag)
    _barrier()  # every rank's part is in storage before anything says the checkpoint exists
    if engine.global_rank == 0:
        before_commit()  # e.g. the run's lease: a superseded or orphaned run commits no checkpoint
        ckpts.commit(tag, step, engine.world_size)
        ckpts.prune(keep)
    _barrier()
    for hook in _after_commit:
        hook(ws.url, tag, step)
    return tag


def load_checkpoint(engine, ws: Workspace, tag: str) -> dict[str, Any]:
    """The client state of checkpoint ``tag`` (fetched from the run's storage into this rank's workspace) after
    loading it into ``engine``; refuses a partial checkpoint, a different rank count, or a load in which DeepSpeed
    finds nothing (it returns (None, None) rather than raising)."""
    ckpts = Checkpoints(ws.url)
    record = ckpts.verify(tag)
    where = ckpts.path(tag)
    if record.get("world_size", engine.world_size) != engine.world_size:
        raise CheckpointError(f"{where}: written by {record['world_size']} ranks, resuming on "
                              f"{engine.world_size}; resume with the same number of ranks")
    folder = ckpts.fetch(ws, tag)
    try:
        path, client_state = engine.load_checkpoint(folder, tag=tag)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed raises many types; name the checkpoint either way
        raise CheckpointError(f"{where}: DeepSpeed could not load it ({type(exc).__name__}: {exc})") from exc
    if path is None:  # DeepSpeed returns (None, None) instead of raising
        raise CheckpointError(f"{where}: DeepSpeed found no checkpoint to load")
    return client_state or {}


def load_rank_state(ws: Workspace, tag: str, rank: int) -> dict[str, Any] | None:
    """This rank's ``rank{R}.pt`` of a loaded checkpoint (then the workspace's copy of the tag is dropped)."""
    path = ws.at(tag, f"rank{rank}.pt")
    state = torch.load(path, weights_only=False) if os.path.exists(path) else None
    ws.discard(tag)
    return state


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


def gathered(params: list[torch.nn.Parameter]):
    """Context in which ZeRO-3-partitioned ``params`` are whole on every rank (read-only)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def fp32_state_dict_from_checkpoint(folder: str, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's own offline consolidation of a ZeRO 1-3 checkpoint's fp32 partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(folder, tag)


def zero3_gpu_bytes(total_params: int, largest_layer_params: int, gpus_per_node: int, nodes: int) -> int:
    """DeepSpeed's own ZeRO-3 model-state estimate (GPU bytes per device), no offload."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_mem, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, gpus_per_node, nodes,
                                                          cpu_offload=False, cpu_offload_params=False)
    return int(gpu_mem)
