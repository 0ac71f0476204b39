"""Per-rank training entry for the autoregressive prior, started by the ``deepspeed`` launcher or Ray Train.

    deepspeed [--hostfile H] --module pipeline.prior.train --config FILE [dotted.key=value ...]

Each rank streams its own share of the committed token shards (``pipeline.prior.loader``) and trains through the
DeepSpeed engine built by ``pipeline.runtime.ds_seam``. Checkpoints hold the model, optimizer, scheduler, the frozen
data plan with the step (the data position: the loader restarts at exactly that sample), per-rank RNG states and the
ds_config. Rank 0 writes ``metrics.jsonl``, TensorBoard events and ``loss_curve.png``, and at the end consolidated
weights ``model.pt`` that sampling loads without DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, load_config, to_dict
from pipeline.prior import metrics as prior_metrics
from pipeline.prior.checkpoints import find_resume, write_weights
from pipeline.prior.loader import DataError, TokenLoader, check_plan, make_plan
from pipeline.prior.objectives import build_objective, make_ema, prior_shape, update_ema
from pipeline.prior.transformer import DalleTransformer, PriorShape
from pipeline.runtime import ds_seam


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available():  # CPU ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ds_seam.init_distributed()
    train(cfg, torch.distributed.get_rank(), torch.distributed.get_world_size())


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """Every random draw of a step (caption dropout, diffusion noise and timesteps) comes from (seed, step, rank)
    alone, so a resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, micro_step, rank]).generate_state(1)[0]))


def train(cfg: Config, rank: int, world: int) -> None:
    p, out = cfg.prior, cfg.path("prior")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    resume = find_resume(out, p.resume, rank)  # refuses before any work when the policy and the folder disagree
    plan = resume.plan if resume else make_plan(cfg.path("tokens"), p.loader_unit_rows)
    if resume:
        check_plan(plan)
    shape = prior_shape(cfg, plan.meta)
    now = json.loads(json.dumps(asdict(shape)))  # as train_state.json holds it (tuples become lists)
    if resume and resume.shape != now:
        changed = sorted(k for k in set(resume.shape) | set(now) if resume.shape.get(k) != now.get(k))
        raise DataError(f"{out}/{resume.tag}: model shape {changed} differs from this config and the data "
                        f"({plan.folder}); keep the checkpoint's shape or train into a new prior.output")
    objective = build_objective(cfg, shape)
    ema = make_ema(cfg, objective)
    ds = ds_seam.build_ds_config(p, world, torch.cuda.is_available())
    engine = ds_seam.initialize(objective, ds)
    start = 0
    if resume:
        client = ds_seam.load_checkpoint(engine, out, resume.tag)
        start = int(client["step"])
        if ema is not None and "ema" in client:
            ema.module.load_state_dict(client["ema"])
        rng = ds_seam.load_rank_state(out, resume.tag, rank)
        if rng is not None:
            _set_rng_state(rng["rng"])
        if rank == 0:
            print(f"[train-prior] resumed from {out}/{resume.tag} at step {start}", flush=True)
        if start >= p.steps and os.path.exists(os.path.join(out, "model.pt")):
            if rank == 0:
                print(f"[train-prior] already trained to step {start}; nothing to do", flush=True)
            return
    loader = TokenLoader(plan, rank=rank, world=world, micro_batch=p.micro_batch_size, text_len=p.text_len,
                         seed=cfg.seed, shuffle_buffer=p.shuffle_buffer,
                         expect_grid=getattr(shape, "image_grid", None), embeddings=objective.needs_embeddings,
                         heldout_percent=p.heldout_percent if objective.needs_embeddings else 0.0)
    try:
        _loop(cfg, Run(engine, loader, shape, plan, ds, ema, rank, world), start)
    finally:
        loader.close()


@dataclass
class Run:
    engine: Any
    loader: TokenLoader
    shape: Any
    plan: Any
    ds: dict[str, Any]
    ema: Any
    rank: int
    world: int


def _micro_step(run: Run, batch, seed: int) -> tuple[float, dict[str, float]]:
    dev = run.engine.device
    tensors = {k: getattr(batch, k) for k in ("text", "image", "text_emb", "image_emb", "valid")}
    tensors = {k: v.to(dev) for k, v in tensors.items() if v is not None}
    loss = run.engine(generator=_step_generator(seed, batch.step, run.rank), **tensors)
    run.engine.backward(loss)
    run.engine.step()
    return float(loss.detach()), run.engine.module.parts


def _loop(cfg: Config, run: Run, start: int) -> None:
    p, out, engine, rank = cfg.prior, cfg.path("prior"), run.engine, run.rank
    gas = p.gradient_accumulation_steps
    log = prior_metrics.MetricsLog(out, p.steps, tensorboard=p.tensorboard) if rank == 0 else None
    if log is not None:
        log.truncate_after(start)  # steps past the checkpoint are trained again; log them once
    keys_file = _open_keys(out, rank, start) if p.record_keys else None
    flops = prior_metrics.flops_for(run.shape, p.text_loss_weight > 0)
    peak = prior_metrics.device_peak_tflops(p.peak_tflops)
    batches = run.loader.batches(start * gas)
    sums: dict[str, float] = {}
    t_window = time.time()
    for step in range(start, p.steps):
        for _ in range(gas):
            batch = next(batches)
            loss, parts = _micro_step(run, batch, cfg.seed)
            for k, v in {"loss": loss, **parts, "micro_batches": 1.0}.items():
                sums[k] = sums.get(k, 0.0) + v
            if keys_file is not None:
                keys_file.write("".join(f"{step}\t{k}\n" for k in batch.keys))
        update_ema(run.ema, engine, p.zero_stage)
        ds_seam.fault_point("step", step + 1, rank)
        done = step + 1
        if done % p.log_every == 0 or done == p.steps:
            _log(run, log, sums, done, flops, peak, time.time() - t_window, cfg)
            sums, t_window = {}, time.time()
        if done == p.steps or (p.save_every and done % p.save_every == 0):
            if keys_file is not None:
                keys_file.flush()
            _save(cfg, run, done)
    if keys_file is not None:
        keys_file.close()
    write_weights(engine, p.zero_stage, run.shape, run.plan.meta, p.steps, os.path.join(out, "model.pt"), run.ema)
    if log is not None:
        log.close()
        prior_metrics.plot_loss_curve(out)


def _log(run: Run, log, sums: dict[str, float], done: int, flops: float, peak: float | None, seconds: float,
         cfg: Config) -> None:
    """Means over the window's micro-batches and all ranks (``valid``: rows trained on, summed)."""
    names = sorted(sums)
    totals = torch.tensor([sums[k] for k in names], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    agg = dict(zip(names, totals.tolist()))
    n = agg.pop("micro_batches")
    rate = n * cfg.prior.micro_batch_size / seconds
    if log is None:
        return
    rec = {k: v if k == "valid" else v / n for k, v in agg.items()}
    log.log({"step": done, **rec, "lr": run.engine.get_lr()[0], "samples_per_s": rate,
             "tokens_per_s": rate * run.shape.seq_len, "mfu": prior_metrics.mfu(rate, flops, run.world, peak),
             "epoch": done * cfg.prior.gradient_accumulation_steps // max(run.loader.steps_per_epoch, 1),
             "unusable_rows_read": run.loader.unusable_rows, **prior_metrics.memory_stats()})


def _save(cfg: Config, run: Run, step: int) -> None:
    gas = cfg.prior.gradient_accumulation_steps
    state: dict[str, Any] = {"step": step, "seed": cfg.seed,
                             "samples_seen": step * cfg.prior.micro_batch_size * run.world * gas}
    files = {"ds_config.json": run.ds, "config.json": to_dict(cfg),
             "train_state.json": {**state, "kind": cfg.prior.kind, "shape": asdict(run.shape),
                                  "data_plan": run.plan.to_json(), "data_position": run.loader.position(step * gas)}}
    client = dict(state, ema=run.ema.module.state_dict()) if run.ema is not None else state
    ds_seam.save_checkpoint(run.engine, cfg.path("prior"), step, client, rank_state={"rng": _rng_state()},
                            files=files, keep=cfg.prior.keep_checkpoints)


def _open_keys(out: str, rank: int, start: int):
    """The consumed-keys audit file of this rank, cut back to the steps before ``start`` (they are trained again)."""
    path = os.path.join(out, f"keys.rank{rank}.txt")
    kept = []
    if os.path.exists(path):
        # A crash can leave a torn last line; whole lines only, and only steps before the checkpoint.
        kept = [line for line in open(path) if line.endswith("\n") and "\t" in line
                and int(line.split("\t", 1)[0]) < start]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def load_prior(path: str) -> tuple[DalleTransformer, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    model = DalleTransformer(PriorShape(**blob["shape"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["tokens_meta"]


if __name__ == "__main__":
    main()
