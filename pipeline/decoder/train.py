"""Per-rank training entry for DALL-E 2's decoder, started by the ``deepspeed`` launcher or Ray Train.

    deepspeed [--hostfile H] --module pipeline.decoder.train --config FILE [dotted.key=value ...]

The priors' trainer with the decoder in it: the same DeepSpeed engine (ZeRO stages, precision, offload), trainer
skeleton (``pipeline.training.loop``), checkpoints with the data position and per-rank RNG states (exact resume),
metrics, TensorBoard and EMA (``pipeline.prior.train.PriorTask``). Its data are the token shards' CLIP image
embeddings and captions joined by key with the image shards' pixels (``pipeline.decoder.data``); rows held out for
the priors' evaluation (``decoder.heldout_percent``, by key hash) are never trained on. Rank 0 writes
``metrics.jsonl`` and at the end ``model.safetensors`` (EMA weights) that sampling loads without DeepSpeed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.curate.filter import check_columns, check_filter, write_selection
from pipeline.decoder.checkpoints import decoder_shape
from pipeline.decoder.data import DecoderLoader, DecoderPlan, check_decoder_plan, make_decoder_plan
from pipeline.decoder.model import Decoder, DecoderShape, forward_flops
from pipeline.errors import DataError
from pipeline.prior import metrics as prior_metrics
from pipeline.prior.checkpoints import ResumePoint, find_resume, write_weights
from pipeline.prior.train import PriorTask
from pipeline.runtime import ds_seam
from pipeline.storage.urls import Workspace, check_writable, exists, join, read_json
from pipeline.storage.weights import MODEL_FILE, saved
from pipeline.training import loop, ranks
from pipeline.training.ema import EMA
from pipeline.training.metrics import MetricsLog, plot_loss_curve, read_metrics
from pipeline.training.ranks import rank_lease, rank_main

PREFIX = "[train-decoder]"


class DecoderObjective(nn.Module):
    """What the engine runs: the decoder's diffusion loss (with its guidance dropout) on a joined batch."""

    kind = "decoder"

    def __init__(self, model: Decoder, image_drop: float, caption_drop: float):
        super().__init__()
        self.model, self.image_drop, self.caption_drop = model, image_drop, caption_drop
        self.parts: dict[str, float] = {}

    def forward(self, text: torch.Tensor, image: torch.Tensor, image_emb: torch.Tensor, valid: torch.Tensor,
                generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        caption = text if self.model.shape.conditioned_on_text else None
        loss, parts = self.model.loss_parts(image, image_emb, caption, valid, self.image_drop, self.caption_drop,
                                            generator)
        self.parts = parts
        return loss


class DecoderTask(PriorTask):
    """PriorTask's step, resume, checkpoints and keys audit, with the decoder's engine, loader and record."""

    prefix = PREFIX

    def __init__(self, cfg: Config, rank: int, world: int, objective: DecoderObjective, shape: DecoderShape,
                 plan: DecoderPlan):
        d = cfg.decoder
        self.cfg, self.p, self.rank, self.world, self.shape, self.plan = cfg, d, rank, world, shape, plan
        self.kind, self.out, self.gas = "decoder", cfg.path("decoder"), d.gradient_accumulation_steps
        self.ws = Workspace(self.out, rank)  # where DeepSpeed and the logs write on this node (PriorTask's own)
        self.ema = EMA(objective.model, decay=d.ema_decay) if d.ema_decay > 0 else None
        self.ds = ds_seam.build_ds_config(d, world, torch.cuda.is_available())
        self.engine = ds_seam.initialize(objective, self.ds)
        self.loader = DecoderLoader(plan, rank=rank, world=world, micro_batch=d.micro_batch_size,
                                    text_len=d.text_len, seed=cfg.seed, shuffle_buffer=d.shuffle_buffer,
                                    heldout_percent=d.heldout_percent)
        self.flops = 3 * forward_flops(shape)  # forward + backward ≈ 3 forwards
        self.peak = prior_metrics.device_peak_tflops(d.peak_tflops)
        self.log: MetricsLog | None = None
        self.keys_file: Any = None
        self.lease_check: Callable[[], None] = lambda: None

    def record(self, done: int, means: dict[str, float], seconds: float) -> tuple[dict[str, Any], None]:
        means = dict(means)
        rate = means.pop(loop.COUNT) * self.p.micro_batch_size / seconds
        return {"step": done, **means, "lr": self.engine.get_lr()[0], "samples_per_s": rate,
                "pixels_per_s": rate * self.shape.image_size ** 2,
                "mfu": prior_metrics.mfu(rate, self.flops, self.world, self.peak),
                "epoch": done * self.gas // max(self.loader.steps_per_epoch, 1),
                "unusable_rows_read": self.loader.unusable_rows, "missing_images": self.loader.missing_images,
                **prior_metrics.memory_stats()}, None


def main(argv: list[str] | None = None) -> None:
    rank_main(argv, __doc__ or "", train)


def launch(cfg: Config) -> dict[str, Any]:
    """Train on ``decoder.num_procs`` ranks (deepspeed launcher, or Ray Train with ``decoder.launcher: ray``)."""
    d, out = cfg.decoder, cfg.path("decoder")
    check_writable(out, "decoder.output")
    if d.filter:  # an unknown or mismatched column stops here, not after the ranks have started
        check_columns(cfg.path("tokens"), d.filter, "decoder.filter")
    launcher = ranks.launch(cfg, d, out, "train-decoder", "pipeline.decoder.train", train, d.num_procs, PREFIX)
    metrics = read_metrics(out)
    state_path = join(out, f"step{d.steps:08d}", "train_state.json")  # the run's storage: a folder or a URL
    counts = read_json(state_path)["data_plan"]["images"]["join"] if exists(state_path) else {}
    return {"ranks": d.num_procs, "zero_stage": d.zero_stage, "steps": d.steps, "launcher": launcher,
            "first_loss": metrics[0]["loss"], "final_loss": metrics[-1]["loss"],
            "samples_per_s": metrics[-1]["samples_per_s"], "missing_images": metrics[-1].get("missing_images"),
            **{f"join_{k}": v for k, v in counts.items()}}


def train(cfg: Config, rank: int, world: int) -> None:
    ranks.check_checkpoint_location(cfg.path("decoder"), cfg.decoder, "decoder.output")
    with rank_lease(cfg.path("decoder"), "train-decoder", rank) as lease_check:
        _train(cfg, rank, world, lease_check)


def _plan(cfg: Config, resume: ResumePoint | None, rank: int) -> DecoderPlan:
    d = cfg.decoder
    size = d.image_size or cfg.download.image_size
    if resume is None:
        return make_decoder_plan(cfg.path("tokens"), cfg.path("tokens_input"), d.loader_unit_rows, size,
                                 count_join=rank == 0, filter=d.filter)
    plan = DecoderPlan.from_json(resume.state["data_plan"])
    check_decoder_plan(plan)
    check_filter(plan.tokens, d.filter, "decoder.filter", f"{cfg.path('decoder')}/{resume.tag}")
    if plan.image_size != size:
        raise DataError(f"{cfg.path('decoder')}/{resume.tag}: trained at {plan.image_size}x{plan.image_size}, this "
                        f"config asks for {size}x{size}; keep the resolution or train into a new decoder.output")
    return plan


def _check_shape(resume: ResumePoint, shape: DecoderShape, out: str) -> None:
    now = json.loads(json.dumps(asdict(shape)))  # as train_state.json holds it (tuples become lists)
    if resume.shape != now:
        changed = sorted(k for k in set(resume.shape) | set(now) if resume.shape.get(k) != now.get(k))
        raise DataError(f"{out}/{resume.tag}: decoder shape {changed} differs from this config and the data "
                        f"(e.g. embed_dim {resume.shape.get('embed_dim')} vs {now['embed_dim']}); keep the "
                        "checkpoint's shape or train into a new decoder.output")


def _train(cfg: Config, rank: int, world: int, lease_check: Callable[[], None]) -> None:
    d, out = cfg.decoder, cfg.path("decoder")
    torch.manual_seed(cfg.seed)
    resume = find_resume(out, d.resume, rank, key="decoder.resume", prefix=PREFIX)
    plan = _plan(cfg, resume, rank)
    shape = decoder_shape(cfg, plan.meta, plan.image_size)
    if resume:
        _check_shape(resume, shape, out)
    objective = DecoderObjective(Decoder(shape, activation_checkpointing=d.activation_checkpointing), d.image_drop,
                                 d.caption_drop)
    task = DecoderTask(cfg, rank, world, objective, shape, plan)
    task.lease_check = lease_check
    if rank == 0:
        write_selection(plan.tokens, task.ws, PREFIX)
    if rank == 0 and plan.join:
        j = plan.join
        print(f"{PREFIX} {j['joined']} rows joined by key; skipped: {j['tokens_without_image']} token rows without "
              f"an image, {j['images_without_tokens']} images without a token row", flush=True)
    start = task.resume(resume) if resume else 0
    if start >= d.steps and saved(join(out, MODEL_FILE)):
        if rank == 0:
            print(f"{PREFIX} already trained to step {start}; nothing to do", flush=True)
        return
    task.open(start)
    try:
        loop.run(task, loop.Cadence(start, d.steps, d.log_every, d.save_every), task.log, summed=("valid",))
    finally:
        task.close()
    if rank == 0:
        lease_check()
    write_weights(task.engine, d.zero_stage, shape, plan.meta, d.steps, join(out, MODEL_FILE), task.ema,
                  kind="decoder")
    if task.log is not None:
        task.log.image("loss_curve", plot_loss_curve(task.ws.local, title="decoder training loss (ε/v MSE)"), d.steps)
        task.log.close()
    task.push_logs("loss_curve.png")


if __name__ == "__main__":
    main()
