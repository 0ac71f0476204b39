"""Per-rank training entry for the autoregressive prior, started by the ``deepspeed`` launcher.

    deepspeed --num_gpus N --module pipeline.train_prior --config FILE [dotted.key=value ...]

Every rank reads the committed token shards, draws its slice of a seeded per-epoch permutation, and trains through
the DeepSpeed engine built by ``pipeline.ds_seam``. Rank 0 writes ``metrics.jsonl`` and, at the end, consolidated
weights ``model.pt`` that sampling loads without DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import ds_seam, schema
from pipeline.config import Config, load_config
from pipeline.prior import DalleTransformer, PriorShape, pad_text


class PriorLoss(nn.Module):
    """What the engine runs: the model plus its loss, so forward hooks (ZeRO-3) see every call."""

    def __init__(self, model: DalleTransformer, text_loss_weight: float):
        super().__init__()
        self.model = model
        self.text_loss_weight = text_loss_weight

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.model.loss(text, image, self.text_loss_weight)


def load_training_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    table, meta = schema.read_token_shards(cfg.path("tokens"), columns=["key", "text_tokens", "image_tokens"])
    text_vocab = int(meta["tokenizer"]["vocab_size"])
    text = pad_text(table.column("text_tokens").to_pylist(), cfg.prior.text_len, text_vocab)
    flat = table.column("image_tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    image = torch.from_numpy(flat.astype(np.int64)).view(table.num_rows, -1)
    return text, image, meta


def prior_shape(cfg: Config, meta: dict[str, Any]) -> PriorShape:
    p = cfg.prior
    return PriorShape(text_vocab=int(meta["tokenizer"]["vocab_size"]), text_len=p.text_len,
                      image_vocab=int(meta["dvae"]["vocab_size"]), image_grid=int(meta["grid"]),
                      n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, dropout=p.dropout)


def batch_indices(n: int, step: int, micro: int, rank: int, world: int, seed: int) -> np.ndarray:
    """Rank ``rank``'s rows for global ``step``: contiguous slices of a seeded permutation per epoch."""
    per_step = micro * world
    steps_per_epoch = max(n // per_step, 1)
    epoch, within = divmod(step, steps_per_epoch)
    perm = np.random.default_rng(seed + epoch).permutation(n)
    start = (within * per_step + rank * micro) % n
    return np.take(perm, np.arange(start, start + micro), mode="wrap")


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
    rank = torch.distributed.get_rank()
    train(cfg, rank, torch.distributed.get_world_size())


def train(cfg: Config, rank: int, world: int) -> None:
    p, out = cfg.prior, cfg.path("prior")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    text, image, meta = load_training_data(cfg)
    shape = prior_shape(cfg, meta)
    model = DalleTransformer(shape, activation_checkpointing=p.activation_checkpointing)
    engine = ds_seam.initialize(PriorLoss(model, p.text_loss_weight),
                                ds_seam.build_ds_config(p, world, torch.cuda.is_available()))
    device = engine.device
    start = 0
    tag = ds_seam.latest_complete(out)
    if tag is not None:
        state = ds_seam.load_checkpoint(engine, out, tag)
        start = int(state["step"])
        if rank == 0:
            print(f"[train-prior] resumed from {out}/{tag} at step {start}", flush=True)
        if start >= p.steps and os.path.exists(os.path.join(out, "model.pt")):
            if rank == 0:
                print(f"[train-prior] already trained to step {start}; nothing to do", flush=True)
            return
    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if rank == 0 else None
    t0, window, seen = time.time(), [], 0
    for step in range(start, p.steps):
        idx = torch.from_numpy(batch_indices(len(text), step, p.micro_batch_size, rank, world, cfg.seed))
        loss = engine(text[idx].to(device), image[idx].to(device))
        engine.backward(loss)
        engine.step()
        window.append(loss.item())
        seen += p.micro_batch_size * world
        if (step + 1) % p.log_every == 0 or step + 1 == p.steps:
            mean = torch.tensor([float(np.mean(window))])
            torch.distributed.all_reduce(mean)
            window = []
            if metrics is not None:
                rate = seen / (time.time() - t0)
                rec = {"step": step + 1, "loss": float(mean) / world, "lr": engine.get_lr()[0],
                       "samples_per_s": rate, "elapsed_s": time.time() - t0}
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                print(f"[train-prior] step {step + 1}/{p.steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                      f"{rate:.0f} samples/s", flush=True)
    ds_seam.save_checkpoint(engine, out, p.steps, {"step": p.steps, "seed": cfg.seed,
                                                   "samples_seen": p.steps * p.micro_batch_size * world})
    state = ds_seam.consolidated_state_dict(engine, p.zero_stage)
    if state is not None:
        weights = {k.removeprefix("model."): v for k, v in state.items()}
        tmp = os.path.join(out, "model.pt.tmp")
        torch.save({"shape": asdict(shape), "state_dict": weights, "tokens_meta": meta, "steps": p.steps}, tmp)
        os.replace(tmp, os.path.join(out, "model.pt"))
    if metrics is not None:
        metrics.close()


def load_prior(path: str) -> tuple[DalleTransformer, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    model = DalleTransformer(PriorShape(**blob["shape"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["tokens_meta"]


if __name__ == "__main__":
    main()
