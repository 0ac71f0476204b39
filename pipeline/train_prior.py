"""Per-rank training entry for the autoregressive prior, started by the ``deepspeed`` launcher or Ray Train.

    deepspeed [--hostfile H] --module pipeline.train_prior --config FILE [dotted.key=value ...]

Each rank streams its own share of the committed token shards (``pipeline.prior_data``) and trains through the
DeepSpeed engine built by ``pipeline.ds_seam``. Checkpoints hold the model, optimizer, scheduler, the frozen data plan
with the step (the data position: the loader restarts at exactly that sample), per-rank RNG states and the ds_config.
Rank 0 writes ``metrics.jsonl``, TensorBoard events and ``loss_curve.png``, and at the end consolidated weights
``model.pt`` that sampling loads without DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import ds_seam, prior_metrics
from pipeline.config import Config, load_config, to_dict
from pipeline.prior import DalleTransformer, PriorShape, drop_captions
from pipeline.prior_ckpt import find_resume, write_weights
from pipeline.prior_data import DataError, TokenLoader, check_plan, make_plan


class PriorLoss(nn.Module):
    """What the engine runs: the model plus its loss, so forward hooks (ZeRO-3) see every call. The split losses of
    the last call are kept (detached) for logging."""

    def __init__(self, model: DalleTransformer, text_loss_weight: float):
        super().__init__()
        self.model = model
        self.text_loss_weight = text_loss_weight
        self.parts: tuple[float, float | None] = (0.0, None)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        total, image_loss, text_loss = self.model.loss_parts(text, image, self.text_loss_weight)
        self.parts = (float(image_loss.detach()), None if text_loss is None else float(text_loss.detach()))
        return total


def prior_shape(cfg: Config, meta: dict[str, Any]) -> PriorShape:
    p = cfg.prior
    attention = tuple(p.layer_attention())
    return PriorShape(text_vocab=int(meta["tokenizer"]["vocab_size"]), text_len=p.text_len,
                      image_vocab=int(meta["dvae"]["vocab_size"]), image_grid=int(meta["grid"]),
                      n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, dropout=p.dropout,
                      attention=() if set(attention) == {"dense"} else attention, conv_kernel=p.conv_kernel)


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


def _caption_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """Caption dropout draws from (seed, step, rank) alone, so a resumed run drops exactly the same captions."""
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
    model = DalleTransformer(shape, activation_checkpointing=p.activation_checkpointing)
    ds = ds_seam.build_ds_config(p, world, torch.cuda.is_available())
    engine = ds_seam.initialize(PriorLoss(model, p.text_loss_weight), ds)
    start = 0
    if resume:
        start = int(ds_seam.load_checkpoint(engine, out, resume.tag)["step"])
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
                         seed=cfg.seed, shuffle_buffer=p.shuffle_buffer, expect_grid=shape.image_grid)
    try:
        _loop(cfg, engine, loader, shape, plan, ds, rank, world, start)
    finally:
        loader.close()


def _loop(cfg: Config, engine, loader: TokenLoader, shape: PriorShape, plan, ds: dict[str, Any], rank: int,
          world: int, start: int) -> None:
    p, out = cfg.prior, cfg.path("prior")
    gas = p.gradient_accumulation_steps
    log = prior_metrics.MetricsLog(out, p.steps, tensorboard=p.tensorboard) if rank == 0 else None
    if log is not None:
        log.truncate_after(start)  # steps past the checkpoint are trained again; log them once
    keys_file = _open_keys(out, rank, start) if p.record_keys else None
    flops = prior_metrics.prior_flops_per_sample(shape, text_head=p.text_loss_weight > 0)
    peak = prior_metrics.device_peak_tflops(p.peak_tflops)
    batches = loader.batches(start * gas)
    sums, t_window = np.zeros(4), time.time()
    for step in range(start, p.steps):
        for _ in range(gas):
            batch = next(batches)
            text = drop_captions(batch.text, p.caption_dropout, shape.text_vocab,
                                 _caption_generator(cfg.seed, batch.step, rank))
            loss = engine(text.to(engine.device), batch.image.to(engine.device))
            engine.backward(loss)
            engine.step()
            image_loss, text_loss = engine.module.parts
            sums += (float(loss), image_loss, text_loss or 0.0, 1)
            if keys_file is not None:
                keys_file.write("".join(f"{step}\t{k}\n" for k in batch.keys))
        ds_seam.fault_point("step", step + 1, rank)
        done = step + 1
        if done % p.log_every == 0 or done == p.steps:
            totals = torch.tensor(sums, dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            rate = totals[3].item() * p.micro_batch_size / (time.time() - t_window)
            if log is not None:
                mean = (totals[:3] / totals[3]).tolist()
                log.log({"step": done, "loss": mean[0], "image_loss": mean[1],
                         "text_loss": mean[2] if p.text_loss_weight > 0 else None, "lr": engine.get_lr()[0],
                         "samples_per_s": rate, "tokens_per_s": rate * shape.seq_len,
                         "mfu": prior_metrics.mfu(rate, flops, world, peak), "epoch": done * gas // max(
                             loader.steps_per_epoch, 1), **prior_metrics.memory_stats()})
            sums, t_window = np.zeros(4), time.time()
        if done == p.steps or (p.save_every and done % p.save_every == 0):
            if keys_file is not None:
                keys_file.flush()
            _save(cfg, engine, shape, plan, ds, done, loader)
    if keys_file is not None:
        keys_file.close()
    write_weights(engine, p.zero_stage, shape, plan.meta, p.steps, os.path.join(out, "model.pt"))
    if log is not None:
        log.close()
        prior_metrics.plot_loss_curve(out)


def _save(cfg: Config, engine, shape: PriorShape, plan, ds: dict[str, Any], step: int, loader: TokenLoader) -> None:
    state = {"step": step, "seed": cfg.seed, "samples_seen": step * cfg.prior.micro_batch_size * engine.world_size *
             cfg.prior.gradient_accumulation_steps}
    files = {"ds_config.json": ds, "config.json": to_dict(cfg),
             "train_state.json": {**state, "shape": asdict(shape), "data_plan": plan.to_json(),
                                  "data_position": loader.position(step * cfg.prior.gradient_accumulation_steps)}}
    ds_seam.save_checkpoint(engine, cfg.path("prior"), step, state, rank_state={"rng": _rng_state()}, files=files,
                            keep=cfg.prior.keep_checkpoints)


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
