"""Per-rank training entry for the dVAE (DALL-E stage one), started by the ``deepspeed`` launcher.

    deepspeed --num_gpus N --module pipeline.dvae.train --config FILE [dotted.key=value ...]

(``python -m pipeline train-dvae`` starts it that way; run without the launcher it is one rank.) The same DeepSpeed
engine, checkpoints and resume as the prior (``pipeline.runtime.ds_seam``). Every rank streams images from the
committed image shards: a global index of (shard, row) is built from the commit markers' ``successes`` counts without
decoding anything, a seeded set of ``dvae.heldout_images`` is held out for evaluation, and each step's rows are a pure
function of (seed, step, rank, world) (``ShardStream``), so a resumed run sees exactly the images, Gumbel noise and
losses of an uninterrupted one. Rank 0 writes ``metrics.jsonl`` (and TensorBoard scalars into ``tb/`` where tensorboard
is installed), held-out reconstruction grids ``recon_step{N:06d}.png``, and at the end the consolidated weights
``dvae.pt`` (what tokenize and sample load) and ``metrics.json`` with the held-out evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.config import Config, DVAEConfig, load_config
from pipeline.dvae.data import ShardCache, ShardStream, choose_heldout, load_image_array, shard_counts
from pipeline.dvae.eval import evaluate, psnr, write_grid
from pipeline.dvae.model import DVAE, DVAEShape, kl_weight_at, save_dvae, temperature_at
from pipeline.runtime import ds_seam

__all__ = ["ShardCache", "ShardStream", "choose_heldout", "load_image_array", "shard_counts", "evaluate", "psnr",
           "write_grid", "main", "train"]

PREFIX = "[train-dvae]"
MIN_LR_RATIO = 0.05  # cosine decay to lr / 20
STAT_KEYS = ("loss", "recon", "recon_mse", "kl")
_STEP_DIR = re.compile(r"^step\d{8}$")


def dvae_shape(cfg: DVAEConfig) -> DVAEShape:
    return DVAEShape(vocab_size=cfg.vocab_size, n_hid=cfg.n_hid, group_count=cfg.group_count,
                     n_blk_per_group=cfg.n_blk_per_group, n_init=cfg.n_init, recon=cfg.recon)


# --------------------------------------------------------------------------------------------------- evaluation


class DVAELoss(nn.Module):
    """What the engine runs: the dVAE's relaxed ELBO as its forward, so the engine sees every call."""

    def __init__(self, dvae: DVAE):
        super().__init__()
        self.dvae = dvae

    def forward(self, x: torch.Tensor, temperature: float, kl_weight: float,
                input_noise: float) -> tuple[torch.Tensor, dict[str, float]]:
        return self.dvae.loss(x, temperature, kl_weight, input_noise)


# ------------------------------------------------------------------------------------------------------ training


def run_settings(cfg: Config, counts: dict[int, int], world: int) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (``steps`` may grow)."""
    d = cfg.dvae
    return {"shape": asdict(dvae_shape(d)), "seed": cfg.seed, "image_size": cfg.download.image_size,
            "batch_size": d.batch_size, "world_size": world, "heldout_images": d.heldout_images,
            "window_shards": d.window_shards, "zero_stage": d.zero_stage, "bf16": d.bf16,
            "shards": {str(k): v for k, v in counts.items()}}


def _fresh_start(out: Path) -> None:
    """Rank 0, when not resuming: remove what an earlier run left here (only files this module writes)."""
    for p in out.iterdir():
        name = p.name
        if p.is_dir() and (_STEP_DIR.match(name) or name == "tb"):
            shutil.rmtree(p)
        elif name in ("latest_complete", "metrics.jsonl", "metrics.json", "dvae.pt", "_run.json") or (
                name.startswith("recon_step") and name.endswith(".png")):
            p.unlink()


def _prune_checkpoints(out: Path, keep: int) -> None:
    if keep <= 0:
        return
    tags = sorted(p.name for p in out.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    latest = ds_seam.latest_complete(str(out))
    for tag in tags[:-keep]:
        if tag != latest:
            shutil.rmtree(out / tag, ignore_errors=True)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class _Scalars:
    """TensorBoard scalars (and grids) on rank 0 where tensorboard is installed; nothing otherwise."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(log_dir=str(folder))

    def add(self, prefix: str, record: dict[str, Any], step: int) -> None:
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()

    def image(self, tag: str, path: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(cfg: Config, rank: int, world: int) -> dict[str, Any] | None:
    """Train on this rank; returns the final result on rank 0 (None elsewhere, or when stopped early)."""
    d, out = cfg.dvae, Path(cfg.path("dvae"))
    size = cfg.download.image_size
    shape = dvae_shape(d)
    if size % shape.downsample:
        raise ValueError(f"image size {size} is not divisible by the dVAE downsampling {shape.downsample}")
    if d.batch_size % world:
        raise ValueError(f"dvae.batch_size {d.batch_size} is not divisible by the {world} ranks")
    micro = d.batch_size // world
    out.mkdir(parents=True, exist_ok=True)
    folder = cfg.path("images")
    box = [shard_counts(folder) if rank == 0 else None]
    if torch.distributed.is_initialized():  # one rank reads the markers; every rank trains on the same index
        torch.distributed.broadcast_object_list(box, src=0)
    counts: dict[int, int] = box[0]
    heldout = choose_heldout(counts, d.heldout_images, cfg.seed)
    rows = {sid: np.delete(np.arange(n, dtype=np.int64), [r for s, r in heldout if s == sid])
            for sid, n in counts.items()}
    stream = ShardStream(rows, cfg.seed, rank, world, d.window_shards)
    cache = ShardCache(folder, counts, size, capacity=2 * d.window_shards)
    settings = run_settings(cfg, counts, world)

    tag = ds_seam.latest_complete(str(out)) if d.resume else None
    run_file = out / "_run.json"
    if tag is not None and run_file.exists():
        old = json.loads(run_file.read_text())
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise ds_seam.CheckpointError(
                f"{out}: its checkpoint {tag} was trained with other settings ({'; '.join(changed)}); set "
                f"dvae.resume=false to start over, or use another dvae.output")
    if tag is not None and (out / "dvae.pt").exists() and (out / "metrics.json").exists():
        done_step = int(json.loads((out / tag / "complete.json").read_text())["step"])
        if done_step >= d.steps:
            if rank == 0:
                print(f"{PREFIX} already trained to step {done_step}; nothing to do", flush=True)
                return json.loads((out / "metrics.json").read_text())["result"]
            return None
    if rank == 0:
        if tag is None:
            _fresh_start(out)
        run_file.write_text(json.dumps(settings, indent=1, sort_keys=True))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

    torch.manual_seed(cfg.seed)
    model = DVAELoss(DVAE(shape))
    on_gpu = torch.cuda.is_available()
    ds_cfg = ds_seam.ds_config(micro_batch_size=micro, world_size=world, lr=d.lr, steps=d.steps,
                               warmup_steps=d.warmup_steps, zero_stage=d.zero_stage, bf16=d.bf16, on_gpu=on_gpu,
                               betas=(0.9, 0.999), weight_decay=0.0, gradient_clipping=0.0,
                               min_lr_ratio=MIN_LR_RATIO)
    engine = ds_seam.initialize(model, ds_cfg)
    device = engine.device
    dtype = torch.bfloat16 if d.bf16 else torch.float32
    start = 0
    if tag is not None:
        state = ds_seam.load_checkpoint(engine, str(out), tag)
        start = int(state["step"])
        if rank == 0:
            print(f"{PREFIX} resumed from {out}/{tag} at step {start}", flush=True)
    end = max(start, min(d.steps, d.stop_after_steps)) if d.stop_after_steps else d.steps

    heldout_x = cache.images(np.array(heldout, dtype=np.int64).reshape(-1, 2)) if rank == 0 and heldout else None
    metrics_path = out / "metrics.jsonl"
    scalars = None
    if rank == 0:  # drop what an interrupted run logged past its checkpoint, so the log reads as one run
        kept = [r for r in _read_jsonl(metrics_path) if r["step"] <= start]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        scalars = _Scalars(out / "tb")
        print(f"{PREFIX} {sum(counts.values())} images in {len(counts)} shards, {len(heldout)} held out; "
              f"{world} ranks × {micro} images per step; steps {start}..{end} of {d.steps}", flush=True)

    def eval_and_grid(module: DVAE, step: int) -> dict[str, Any]:
        figures, rec = evaluate(module, heldout_x)
        grid = out / f"recon_step{step:06d}.png"
        write_grid(heldout_x, rec, str(grid))
        record = {"kind": "eval", "step": step, **figures}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars.add("eval", record, step)
        scalars.image("recon", str(grid), step)
        f = figures
        print(f"{PREFIX} eval step {step}: held-out mse {f['heldout_mse']:.5f} psnr {f['heldout_psnr']:.2f} dB "
              f"(baselines: constant image {f['constant_baseline_mse']:.5f}, flat colour "
              f"{f['flat_colour_baseline_mse']:.5f}); perplexity {f['perplexity']:.1f}, "
              f"{f['codes_used']}/{shape.vocab_size} codes used", flush=True)
        return figures

    def batch(step: int) -> torch.Tensor:
        return cache.images(stream.step_rows(step, micro))

    # One thread reads and decodes step n+1's images while step n trains (the rows are known in advance).
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="dvae-prefetch")
    upcoming = prefetch.submit(batch, start) if start < end else None
    t0, window, seen, last_saved = time.time(), torch.zeros(len(STAT_KEYS) + 1, dtype=torch.float64), 0, start
    engine.train()
    for step in range(start, end):
        x = upcoming.result().to(device=device, dtype=dtype)
        if step + 1 < end:
            upcoming = prefetch.submit(batch, step + 1)
        tau = temperature_at(step, d.steps, d.temp_start, d.temp_end)
        beta = kl_weight_at(step, d.kl_warmup_steps, d.kl_weight)
        torch.manual_seed(_step_seed(cfg.seed, step, rank))  # the Gumbel and input noise of this step, on resume too
        loss, stats = engine(x, tau, beta, d.input_noise)
        engine.backward(loss)
        engine.step()
        window += torch.tensor([*(stats[k] for k in STAT_KEYS), 1.0], dtype=torch.float64)
        seen += micro * world
        done = step + 1
        if done % d.log_every == 0 or done == end:
            torch.distributed.all_reduce(window)
            mean = {k: float(window[i] / window[-1]) for i, k in enumerate(STAT_KEYS)}
            window.zero_()
            if rank == 0:
                elapsed = time.time() - t0
                rec = {"kind": "train", "step": done, **mean, "tau": tau, "kl_weight": beta,
                       "lr": float(engine.get_lr()[0]), "images_per_s": seen / elapsed, "elapsed_s": elapsed}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                scalars.add("train", rec, done)
                print(f"{PREFIX} step {done}/{d.steps} loss {mean['loss']:.4f} mse {mean['recon_mse']:.4f} "
                      f"kl {mean['kl']:.3f} tau {tau:.3f} {rec['images_per_s']:.0f} images/s", flush=True)
        if rank == 0 and heldout_x is not None and d.grid_every and done % d.grid_every == 0 and done < d.steps:
            eval_and_grid(engine.module.dvae, done)
        if (d.save_every and done % d.save_every == 0) or done == end:
            ds_seam.save_checkpoint(engine, str(out), done, {"step": done, "seed": cfg.seed,
                                                             "images_seen": done * d.batch_size})
            last_saved = done
            if rank == 0:
                _prune_checkpoints(out, d.keep_checkpoints)
    prefetch.shutdown()
    if end < d.steps:
        if rank == 0:
            print(f"{PREFIX} stopped after step {end} (dvae.stop_after_steps); checkpoint {out}/step{end:08d}",
                  flush=True)
            scalars.close()
        return None
    if last_saved < d.steps:  # resumed at the end but the final weights were never written
        ds_seam.save_checkpoint(engine, str(out), d.steps, {"step": d.steps, "seed": cfg.seed,
                                                            "images_seen": d.steps * d.batch_size})
    state = ds_seam.consolidated_state_dict(engine, d.zero_stage)
    if rank != 0 or state is None:
        return None
    final = DVAE(shape)
    final.load_state_dict({k.removeprefix("dvae."): v for k, v in state.items()})
    final.eval()
    train_hist = [r for r in _read_jsonl(metrics_path) if r["kind"] == "train"]
    result: dict[str, Any] = {
        "steps": d.steps, "final_loss": train_hist[-1]["loss"] if train_hist else None,
        "final_recon_mse": train_hist[-1]["recon_mse"] if train_hist else None,
        "ranks": world, "zero_stage": d.zero_stage, "train_images": int(sum(len(r) for r in rows.values())),
        "heldout_images": len(heldout), "vocab_size": d.vocab_size, "grid": shape.grid(size), "image_size": size,
        "shard_reads": cache.reads, "seconds": round(time.time() - t0, 2),
        "images_per_s": seen / max(time.time() - t0, 1e-9),
    }
    if heldout_x is not None:
        figures = eval_and_grid(final, d.steps)
        result.update(figures, recon_grid=str(out / f"recon_step{d.steps:06d}.png"))
    scalars.close()
    history = _read_jsonl(metrics_path)
    tmp = out / "dvae.pt.tmp"
    save_dvae(final, str(tmp), extra=result)
    os.replace(tmp, out / "dvae.pt")
    doc = {"result": result, "history": [r for r in history if r["kind"] == "train"],
           "evals": [r for r in history if r["kind"] == "eval"]}
    (out / "metrics.json.tmp").write_text(json.dumps(doc))
    os.replace(out / "metrics.json.tmp", out / "metrics.json")
    return result


@contextlib.contextmanager
def _single_rank_env() -> Iterator[bool]:
    """Outside the launcher (no WORLD_SIZE): make this process rank 0 of 1 for as long as it trains."""
    if "WORLD_SIZE" in os.environ:
        yield False
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield True
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    threads = torch.get_num_threads()
    with _single_rank_env() as standalone:
        world = int(os.environ["WORLD_SIZE"])
        if not torch.cuda.is_available():  # CPU ranks share the machine's cores (OMP_NUM_THREADS, if set, wins)
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // world)))
        ds_seam.init_distributed()
        try:
            return train(cfg, torch.distributed.get_rank(), torch.distributed.get_world_size())
        finally:
            # The one-rank process group stays for a later call in this process: DeepSpeed caches its groups.
            if standalone:
                torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
