"""Per-rank training entry for the autoregressive prior, started by the ``deepspeed`` launcher or Ray Train.

    deepspeed [--hostfile H] --module pipeline.prior.train --config FILE [dotted.key=value ...]

Each rank streams its own share of the committed token shards (``pipeline.prior.loader``) and trains through the
DeepSpeed engine built by ``pipeline.runtime.ds_seam``, in the trainer skeleton
(``pipeline.training.loop``) the dVAE uses too. Checkpoints hold the model, optimizer, scheduler, the frozen
data plan with the step (the data position: the loader restarts at exactly that sample), per-rank RNG states and the
ds_config. Rank 0 writes ``metrics.jsonl``, TensorBoard events and ``loss_curve.png``, and at the end consolidated
weights ``model.safetensors`` (+ ``model.json``) that sampling loads without DeepSpeed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from pipeline.config import Config, to_dict
from pipeline.curate.filter import check_columns, check_filter, read_selection, write_selection
from pipeline.errors import DataError
from pipeline.prior import metrics as prior_metrics
from pipeline.prior.checkpoints import ResumePoint, find_resume, write_weights
from pipeline.prior.loader import TokenLoader, check_plan, make_plan
from pipeline.prior.objectives import build_objective, make_ema, prior_shape, update_ema
from pipeline.runtime import ds_seam
from pipeline.storage.commit import atomic_output
from pipeline.storage.faults import fault_point
from pipeline.storage.urls import Workspace, check_writable, join
from pipeline.storage.weights import MODEL_FILE, saved
from pipeline.training import loop, ranks, tracking
from pipeline.training.metrics import METRICS_FILE, MetricsLog, plot_loss_curve, read_metrics
from pipeline.training.ranks import rank_lease, rank_main, rng_state, set_rng_state, step_generator

PREFIX = "[train-prior]"


def main(argv: list[str] | None = None) -> None:
    rank_main(argv, __doc__ or "", train)


def launch(cfg: Config) -> dict[str, Any]:
    """Train on ``prior.num_procs`` ranks: through the deepspeed launcher, or on Ray Train workers running the same
    per-rank ``train`` (``prior.launcher``); the run's summary from its metrics."""
    p, out = cfg.prior, cfg.path("prior")
    check_writable(out, "prior.output")
    if p.filter:  # an unknown or mismatched column stops here, not after the ranks have started
        check_columns(cfg.path("tokens"), p.filter, "prior.filter")
    launcher = ranks.launch(cfg, p, out, "train-prior", "pipeline.prior.train", train, p.num_procs, PREFIX)
    metrics = read_metrics(out)
    return {"ranks": p.num_procs, "zero_stage": p.zero_stage, "steps": p.steps, "launcher": launcher,
            "first_loss": metrics[0]["loss"], "final_loss": metrics[-1]["loss"],
            "samples_per_s": metrics[-1]["samples_per_s"], **read_selection(out)}


def train(cfg: Config, rank: int, world: int) -> None:
    ranks.check_checkpoint_location(cfg.path("prior"), cfg.prior, "prior.output")
    with rank_lease(cfg.path("prior"), "train-prior", rank) as lease_check:
        _train(cfg, rank, world, lease_check)


def _train(cfg: Config, rank: int, world: int, lease_check: Callable[[], None]) -> None:
    p, out = cfg.prior, cfg.path("prior")
    torch.manual_seed(cfg.seed)
    resume = find_resume(out, p.resume, rank)  # refuses before any work when the policy and the folder disagree
    plan = resume.plan if resume else make_plan(cfg.path("tokens"), p.loader_unit_rows, p.filter)
    shape = prior_shape(cfg, plan.meta)
    if resume:
        _check_resume(resume, shape, out)
        check_filter(resume.plan, p.filter, "prior.filter", f"{out}/{resume.tag}")
    if rank == 0:
        write_selection(plan, Workspace(out, rank), PREFIX)
    objective = build_objective(cfg, shape)
    task = PriorTask(cfg, rank, world, objective, shape, plan)
    task.lease_check = lease_check
    start = task.resume(resume) if resume else 0
    if start >= p.steps and saved(join(out, MODEL_FILE)):
        if rank == 0:
            print(f"{PREFIX} already trained to step {start}; nothing to do", flush=True)
        return
    task.open(start)
    try:
        loop.run(task, loop.Cadence(start, p.steps, p.log_every, p.save_every), task.log, summed=("valid",))
    finally:
        task.close()
    if rank == 0:
        lease_check()
    write_weights(task.engine, p.zero_stage, shape, plan.meta, p.steps, join(out, MODEL_FILE), task.ema)
    if task.log is not None:
        task.log.image("loss_curve", plot_loss_curve(task.ws.local), p.steps)
        task.log.close()
    task.push_logs("loss_curve.png")


def _check_resume(resume: ResumePoint, shape: Any, out: str) -> None:
    """The checkpoint's data are still what its plan froze, and its model shape is this config's."""
    check_plan(resume.plan)
    now = json.loads(json.dumps(asdict(shape)))  # as train_state.json holds it (tuples become lists)
    if resume.shape != now:
        changed = sorted(k for k in set(resume.shape) | set(now) if resume.shape.get(k) != now.get(k))
        raise DataError(f"{out}/{resume.tag}: model shape {changed} differs from this config and the data "
                        f"({resume.plan.folder}); keep the checkpoint's shape or train into a new prior.output")


class PriorTask:
    """One optimizer step of either prior on one rank (``gradient_accumulation_steps`` micro-batches), its log
    record, its checkpoints and the consumed-keys audit. The decoder's task (``pipeline.decoder.train``) is this
    one with its own model, loader and record."""

    prefix = PREFIX  # of console lines (the launcher echoes lines with it)

    def __init__(self, cfg: Config, rank: int, world: int, objective: Any, shape: Any, plan: Any):
        p = cfg.prior
        self.cfg, self.p, self.rank, self.world, self.shape, self.plan = cfg, p, rank, world, shape, plan
        self.kind = p.kind
        self.out, self.gas = cfg.path("prior"), p.gradient_accumulation_steps
        self.ws = Workspace(self.out, rank)  # where DeepSpeed and the logs write on this node
        self.ema = make_ema(cfg, objective)
        self.ds = ds_seam.build_ds_config(p, world, torch.cuda.is_available())
        self.engine = ds_seam.initialize(objective, self.ds)
        self.loader = TokenLoader(plan, rank=rank, world=world, micro_batch=p.micro_batch_size, text_len=p.text_len,
                                  seed=cfg.seed, shuffle_buffer=p.shuffle_buffer,
                                  expect_grid=getattr(shape, "image_grid", None),
                                  embeddings=objective.needs_embeddings,
                                  heldout_percent=p.heldout_percent if objective.needs_embeddings else 0.0)
        self.flops = prior_metrics.flops_for(shape, p.text_loss_weight > 0)
        self.peak = prior_metrics.device_peak_tflops(p.peak_tflops)
        self.log: MetricsLog | None = None
        self.keys_file: Any = None
        self.lease_check: Callable[[], None] = lambda: None

    def resume(self, resume: ResumePoint) -> int:
        """Load the checkpoint (engine, EMA, this rank's RNG state); the step it reached."""
        client = ds_seam.load_checkpoint(self.engine, self.ws, resume.tag)
        if self.ema is not None and "ema" in client:
            self.ema.module.load_state_dict(client["ema"])
        rng = ds_seam.load_rank_state(self.ws, resume.tag, self.rank)
        if rng is not None:
            set_rng_state(rng["rng"])
        start = int(client["step"])
        if self.rank == 0:
            print(f"{self.prefix} resumed from {self.out}/{resume.tag} at step {start}", flush=True)
        return start

    def open(self, start: int) -> None:
        if self.rank == 0:
            self.ws.pull(METRICS_FILE)  # the run's log so far, from its storage
            tracker = tracking.open_run(self.cfg.logging.wandb, self.prefix.strip("[]"), self.out, self.ws.local,
                                        to_dict(self.cfg))
            self.log = MetricsLog(self.ws.local, self.p.steps, tensorboard=self.p.tensorboard, prefix=self.prefix,
                                  tracker=tracker)
            self.log.truncate_after(start)  # steps past the checkpoint are trained again; log them once
        if self.p.record_keys:
            self.ws.pull(_keys_name(self.rank))
            self.keys_file = _open_keys(self.ws.local, self.rank, start)
        self.batches = self.loader.batches(start * self.gas)

    def close(self) -> None:
        if self.keys_file is not None:
            self.keys_file.close()
        self.loader.close()

    def step(self, step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        for _ in range(self.gas):
            batch = next(self.batches)
            dev = self.engine.device
            tensors = {k: getattr(batch, k) for k in ("text", "image", "text_emb", "image_emb", "valid")}
            tensors = {k: v.to(dev) for k, v in tensors.items() if v is not None}
            loss = self.engine(generator=step_generator(self.cfg.seed, batch.step, self.rank), **tensors)
            self.engine.backward(loss)
            self.engine.step()
            for k, v in {"loss": float(loss.detach()), **self.engine.module.parts, loop.COUNT: 1.0}.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.keys_file is not None:
                self.keys_file.write("".join(f"{step}\t{k}\n" for k in batch.keys))
        update_ema(self.ema, self.engine, self.p.zero_stage)
        fault_point("step", step + 1, self.rank)
        return sums

    def record(self, done: int, means: dict[str, float], seconds: float) -> tuple[dict[str, Any], None]:
        """Means over the window's micro-batches and all ranks (``valid``: rows trained on, summed)."""
        means = dict(means)
        rate = means.pop(loop.COUNT) * self.p.micro_batch_size / seconds
        return {"step": done, **means, "lr": self.engine.get_lr()[0], "samples_per_s": rate,
                "tokens_per_s": rate * self.shape.seq_len,
                "mfu": prior_metrics.mfu(rate, self.flops, self.world, self.peak),
                "epoch": done * self.gas // max(self.loader.steps_per_epoch, 1),
                "unusable_rows_read": self.loader.unusable_rows, **prior_metrics.memory_stats()}, None

    def after_log(self, done: int) -> None:
        pass

    def push_logs(self, *extra: str) -> None:
        """This rank's logs to the run's storage: rank 0's metrics and TensorBoard events, every rank's keys."""
        if self.keys_file is not None:
            if not self.keys_file.closed:
                self.keys_file.flush()
            self.ws.push(_keys_name(self.rank))
        if self.rank == 0:  # the log flushes every record
            self.ws.push(METRICS_FILE, "tensorboard", *extra)

    def save(self, step: int) -> None:
        self.push_logs()
        state: dict[str, Any] = {"step": step, "seed": self.cfg.seed,
                                 "samples_seen": step * self.p.micro_batch_size * self.world * self.gas}
        files = {"ds_config.json": self.ds, "config.json": to_dict(self.cfg),
                 "train_state.json": {**state, "kind": self.kind, "shape": asdict(self.shape),
                                      "data_plan": self.plan.to_json(),
                                      "data_position": self.loader.position(step * self.gas)}}
        client = dict(state, ema=self.ema.module.state_dict()) if self.ema is not None else state
        ds_seam.save_checkpoint(self.engine, self.ws, step, client, rank_state={"rng": rng_state()},
                                files=files, keep=self.p.keep_checkpoints, before_commit=self.lease_check)


def _keys_name(rank: int) -> str:
    return f"keys.rank{rank}.txt"


def _open_keys(out: str, rank: int, start: int):
    """The consumed-keys audit file of this rank, cut back to the steps before ``start`` (they are trained again)."""
    path = os.path.join(out, _keys_name(rank))
    kept = []
    if os.path.exists(path):
        # A crash can leave a torn last line; whole lines only, and only steps before the checkpoint.
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and "\t" in line
                    and int(line.split("\t", 1)[0]) < start]
    with atomic_output(path, "w") as f:
        f.writelines(kept)
    return open(path, "a")


if __name__ == "__main__":
    main()
