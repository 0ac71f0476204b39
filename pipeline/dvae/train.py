"""Per-rank training entry for the dVAE (DALL-E stage one), started by the ``deepspeed`` launcher.

    deepspeed --num_gpus N --module pipeline.dvae.train --config FILE [dotted.key=value ...]

(``python -m pipeline train-dvae`` starts it that way; run without the launcher it is one rank.) The same DeepSpeed
engine, trainer skeleton (``pipeline.training``), checkpoints and resume as the priors. Every rank streams images from
the committed image shards: a global index of (shard, row) is built from the commit markers' ``successes`` counts
without decoding anything, a seeded set of ``dvae.heldout_images`` is held out for evaluation, and each step's rows
are a pure function of (seed, step, rank, world) (``ShardStream``), so a resumed run sees exactly the images, Gumbel
noise and losses of an uninterrupted one. Rank 0 writes ``metrics.jsonl`` (and TensorBoard scalars into ``tb/``),
held-out reconstruction grids ``recon_step{N:06d}.png``, and at the end the consolidated weights
``dvae.safetensors`` (what tokenize and sample load) and ``metrics.json`` with the held-out evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Config, DVAEConfig, to_dict
from pipeline.curate.filter import select_image_rows, write_selection
from pipeline.dvae.data import ShardCache, ShardStream, choose_heldout, shard_counts
from pipeline.dvae.eval import evaluate, write_grid
from pipeline.dvae.model import DVAE, DVAEShape, kl_weight_at, save_dvae, temperature_at
from pipeline.errors import ConfigError
from pipeline.runtime import ds_seam
from pipeline.storage import commit
from pipeline.storage.checkpoints import Checkpoints
from pipeline.storage.urls import Workspace, check_writable, exists, join, read_json
from pipeline.storage.weights import DVAE_FILE, saved
from pipeline.training import loop, ranks, tracking
from pipeline.training.metrics import METRICS_FILE, MetricsLog, read_metrics
from pipeline.training.ranks import check_checkpoint_location, rank_lease, rank_main, step_seed

logger = logging.getLogger(__name__)

PREFIX = "[train-dvae]"
MIN_LR_RATIO = 0.05  # cosine decay to lr / 20
STAT_KEYS = ("loss", "recon", "recon_mse", "kl")
# what a fresh start removes (and tb/, grids)
OUTPUTS = ("metrics.jsonl", "metrics.json", DVAE_FILE, "dvae.json", "_run.json")


def dvae_shape(cfg: DVAEConfig) -> DVAEShape:
    return DVAEShape(vocab_size=cfg.vocab_size, n_hid=cfg.n_hid, group_count=cfg.group_count,
                     n_blk_per_group=cfg.n_blk_per_group, n_init=cfg.n_init, recon=cfg.recon)


class DVAELoss(nn.Module):
    """What the engine runs: the dVAE's relaxed ELBO as its forward, so the engine sees every call."""

    def __init__(self, dvae: DVAE):
        super().__init__()
        self.dvae = dvae

    def forward(self, x: torch.Tensor, temperature: float, kl_weight: float,
                input_noise: float) -> tuple[torch.Tensor, dict[str, float]]:
        return self.dvae.loss(x, temperature, kl_weight, input_noise)


def run_settings(cfg: Config, counts: dict[int, int], world: int, selection: dict | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (``steps`` may grow)."""
    d = cfg.dvae
    return {"shape": asdict(dvae_shape(d)), "seed": cfg.seed, "image_size": cfg.download.image_size,
            "batch_size": d.batch_size, "world_size": world, "heldout_images": d.heldout_images,
            "window_shards": d.window_shards, "zero_stage": d.zero_stage, "bf16": d.bf16,
            "shards": {str(k): v for k, v in counts.items()},
            **({"filter": selection} if selection else {})}  # the filter and a hash of the rows it kept


@dataclass
class Images:
    """This rank's view of the committed image shards: the index, the held-out rows and the training stream."""
    counts: dict[int, int]
    heldout: list[tuple[int, int]]
    train_images: int
    stream: ShardStream
    cache: ShardCache
    selection: dict | None = None  # dvae.filter's record: the filter, its counts per clause, the kept rows' hash


def _images(cfg: Config, rank: int, world: int) -> Images:
    d, folder = cfg.dvae, cfg.path("images")
    box = [_index(folder, d.filter) if rank == 0 else None]
    if torch.distributed.is_initialized():  # one rank reads the markers; every rank trains on the same index
        torch.distributed.broadcast_object_list(box, src=0)
    counts, selection, masks = box[0]
    heldout = choose_heldout(counts, d.heldout_images, cfg.seed)
    rows = {sid: np.delete(np.arange(n, dtype=np.int64), [r for s, r in heldout if s == sid])
            for sid, n in counts.items()}
    if masks is not None:  # dvae.filter: only the images it keeps, for training and evaluation alike
        rows = {sid: r[masks[sid][r]] for sid, r in rows.items()}
        heldout = [(s, r) for s, r in heldout if masks[s][r]]
    return Images(counts, heldout, int(sum(len(r) for r in rows.values())),
                  ShardStream(rows, cfg.seed, rank, world, d.window_shards),
                  ShardCache(folder, counts, cfg.download.image_size, capacity=2 * d.window_shards), selection)


def _index(folder: str, filter: str) -> tuple[dict[int, int], dict | None, dict[int, np.ndarray] | None]:
    """Rank 0: the images per shard and, with ``dvae.filter``, its record and the kept rows per shard."""
    counts = shard_counts(folder)
    if not filter:
        return counts, None, None
    chosen = select_image_rows(folder, counts, filter)
    digest = hashlib.sha256(b"".join(np.packbits(chosen["masks"][s]).tobytes() for s in sorted(counts)))
    return counts, dict(chosen["record"], kept_sha256=digest.hexdigest()), chosen["masks"]


def _fresh_start(out: str) -> None:
    """Rank 0, when not resuming: remove what an earlier run left here (only what this trainer writes)."""
    Checkpoints(out, PREFIX).clear()
    fs, path = commit.fs_and_path(out)
    fs.invalidate_cache()
    for entry in fs.ls(path, detail=True) if fs.exists(path) else []:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if name == "tb" and entry["type"] == "directory":
            commit.remove(fs, f"{path}/tb", recursive=True)
        elif name in OUTPUTS or (name.startswith("recon_step") and name.endswith(".png")):
            commit.remove(fs, f"{path}/{name}")


def _resume(cfg: Config, out: str, settings: dict[str, Any], rank: int) -> tuple[str | None, dict | None]:
    """(checkpoint tag to resume or None, the final result when the run is already complete).

    Only rank 0 touches the run record ``_run.json`` here (checks it, or rewrites it on a fresh start); the other
    ranks check it in ``_check_run_record`` after the barrier that follows, once rank 0 is done with it: a rank that
    read it while rank 0 rewrote it saw a half-written or missing file (the dVAE test failed that way under load)."""
    d = cfg.dvae
    fs, path = commit.fs_and_path(out)
    tag = Checkpoints(out, PREFIX).resume_tag("auto", "dvae.resume", rank) if d.resume else None
    if tag is not None:
        if rank == 0:
            _check_run_record(out, settings, tag)
        done = saved(join(out, DVAE_FILE)) and exists(join(out, "metrics.json"))
        if done and Checkpoints(out).step(tag) >= d.steps:
            return tag, read_json(join(out, "metrics.json"))["result"]
    elif rank == 0:
        _fresh_start(out)
        commit.claim_run(fs, path, "train-dvae", settings, replace=True)
    return tag, None


def _check_run_record(out: str, settings: dict[str, Any], tag: str) -> None:
    """Refuse to resume ``tag`` when the run record says it was trained with other settings."""
    fs, path = commit.fs_and_path(out)
    commit.claim_run(fs, path, "train-dvae", settings, refusal=f"refusing to resume its checkpoint {tag}",
                     hint="Set dvae.resume=false to start over, or use another dvae.output.")


class DVAETask:
    """One optimizer step of the dVAE on one rank, its log record, its held-out grids and its checkpoints."""

    def __init__(self, cfg: Config, engine: Any, images: Images, rank: int, world: int, log: MetricsLog | None,
                 heldout_x: torch.Tensor | None):
        self.cfg, self.d, self.engine, self.images = cfg, cfg.dvae, engine, images
        self.rank, self.world, self.micro, self.log = rank, world, cfg.dvae.batch_size // world, log
        self.heldout_x, self.out = heldout_x, cfg.path("dvae")
        self.ws = Workspace(self.out, rank)  # where DeepSpeed, the log and the grids write on this node
        self.dtype = torch.bfloat16 if cfg.dvae.bf16 else torch.float32
        # One thread reads and decodes step n+1's images while step n trains (the rows are known in advance).
        self.prefetch = ThreadPoolExecutor(1, thread_name_prefix="dvae-prefetch")
        self.upcoming: Any = None
        self.end = cfg.dvae.steps  # the last step this run trains (dvae.stop_after_steps may stop it earlier)
        self.lease_check: Callable[[], None] = lambda: None
        self.t0, self.seen = time.time(), 0

    def _batch(self, step: int) -> torch.Tensor:
        return self.images.cache.images(self.images.stream.step_rows(step, self.micro))

    def step(self, step: int) -> dict[str, float]:
        d = self.d
        x = (self.upcoming or self.prefetch.submit(self._batch, step)).result()
        self.upcoming = self.prefetch.submit(self._batch, step + 1) if step + 1 < self.end else None
        tau = temperature_at(step, d.steps, d.temp_start, d.temp_end)
        beta = kl_weight_at(step, d.kl_warmup_steps, d.kl_weight)
        torch.manual_seed(step_seed(self.cfg.seed, step, self.rank))  # this step's Gumbel and input noise
        loss, stats = self.engine(x.to(device=self.engine.device, dtype=self.dtype), tau, beta, d.input_noise)
        self.engine.backward(loss)
        self.engine.step()
        self.seen += self.micro * self.world
        return {**{k: float(stats[k]) for k in STAT_KEYS}, loop.COUNT: 1.0}

    def record(self, done: int, means: dict[str, float], seconds: float) -> tuple[dict[str, Any], str]:
        d, elapsed = self.d, time.time() - self.t0
        tau = temperature_at(done - 1, d.steps, d.temp_start, d.temp_end)
        rec = {"kind": "train", "step": done, **{k: means[k] for k in STAT_KEYS}, "tau": tau,
               "kl_weight": kl_weight_at(done - 1, d.kl_warmup_steps, d.kl_weight),
               "lr": float(self.engine.get_lr()[0]), "images_per_s": self.seen / elapsed, "elapsed_s": elapsed}
        return rec, (f"{PREFIX} step {done}/{d.steps} loss {means['loss']:.4f} mse {means['recon_mse']:.4f} "
                     f"kl {means['kl']:.3f} tau {tau:.3f} {rec['images_per_s']:.0f} images/s")

    def after_log(self, done: int) -> None:
        d = self.d
        if self.log is not None and self.heldout_x is not None and d.grid_every and done % d.grid_every == 0 \
                and done < d.steps:
            self.evaluate(self.engine.module.dvae, done)

    def push_logs(self) -> None:
        """Rank 0's log, TensorBoard events and grids to the run's storage (before the checkpoint that covers them)."""
        if self.log is not None:
            self.ws.push(METRICS_FILE, "tb", *(n for n in os.listdir(self.ws.local) if n.startswith("recon_step")))

    def save(self, done: int) -> None:
        self.push_logs()
        ds_seam.save_checkpoint(self.engine, self.ws, done, {"step": done, "seed": self.cfg.seed,
                                                              "images_seen": done * self.d.batch_size},
                                keep=self.d.keep_checkpoints, before_commit=self.lease_check)

    def evaluate(self, module: DVAE, step: int) -> dict[str, Any]:
        """Rank 0: held-out figures and the reconstruction grid of ``step``, logged as an eval record."""
        assert self.log is not None and self.heldout_x is not None
        figures, rec = evaluate(module, self.heldout_x)
        grid = self.ws.at(f"recon_step{step:06d}.png")
        write_grid(self.heldout_x, rec, grid)
        f = figures
        self.log.log({"kind": "eval", "step": step, **figures}, section="eval", console=(
            f"{PREFIX} eval step {step}: held-out mse {f['heldout_mse']:.5f} psnr {f['heldout_psnr']:.2f} dB "
            f"(baselines: constant image {f['constant_baseline_mse']:.5f}, flat colour "
            f"{f['flat_colour_baseline_mse']:.5f}); perplexity {f['perplexity']:.1f}, "
            f"{f['codes_used']}/{self.d.vocab_size} codes used"))
        self.log.image("recon", grid, step)
        return figures


def train(cfg: Config, rank: int, world: int) -> dict[str, Any] | None:
    """Train on this rank; returns the final result on rank 0 (None elsewhere, or when stopped early)."""
    check_checkpoint_location(cfg.path("dvae"), cfg.dvae, "dvae.output")
    with rank_lease(cfg.path("dvae"), "train-dvae", rank) as lease_check:
        return _train(cfg, rank, world, lease_check)


def _train(cfg: Config, rank: int, world: int, lease_check: Callable[[], None]) -> dict[str, Any] | None:
    d, out, size = cfg.dvae, cfg.path("dvae"), cfg.download.image_size
    shape = dvae_shape(d)
    if size % shape.downsample:
        raise ConfigError(f"image size {size} is not divisible by the dVAE downsampling {shape.downsample}")
    if d.batch_size % world:
        raise ConfigError(f"dvae.batch_size {d.batch_size} is not divisible by the {world} ranks")
    images = _images(cfg, rank, world)
    settings = run_settings(cfg, images.counts, world, images.selection and {
        k: images.selection[k] for k in ("filter", "kept_sha256")})
    tag, finished = _resume(cfg, out, settings, rank)
    if finished is not None:
        if rank == 0:
            print(f"{PREFIX} already trained to step {Checkpoints(out).step(tag)}; nothing to do", flush=True)
        return finished if rank == 0 else None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has written (or checked) _run.json: the others may read it now
    if rank != 0 and tag is not None:
        _check_run_record(out, settings, tag)
    torch.manual_seed(cfg.seed)
    engine = ds_seam.initialize(DVAELoss(DVAE(shape)), ds_seam.ds_config(
        micro_batch_size=d.batch_size // world, world_size=world, lr=d.lr, steps=d.steps,
        warmup_steps=d.warmup_steps, zero_stage=d.zero_stage, bf16=d.bf16, on_gpu=torch.cuda.is_available(),
        betas=(0.9, 0.999), weight_decay=0.0, gradient_clipping=0.0, min_lr_ratio=MIN_LR_RATIO))
    start, ws = 0, Workspace(out, rank)
    if tag is not None:
        start = int(ds_seam.load_checkpoint(engine, ws, tag)["step"])
        ws.discard(tag)
        if rank == 0:
            print(f"{PREFIX} resumed from {out}/{tag} at step {start}", flush=True)
    end = max(start, min(d.steps, d.stop_after_steps)) if d.stop_after_steps else d.steps
    log, heldout_x = None, None
    if rank == 0:
        heldout_x = images.cache.images(np.array(images.heldout, dtype=np.int64).reshape(-1, 2)) \
            if images.heldout else None
        ws.pull(METRICS_FILE)  # the run's log so far, from its storage
        log = MetricsLog(ws.local, d.steps, prefix=PREFIX, tb_dir="tb",
                         tracker=tracking.open_run(cfg.logging.wandb, "train-dvae", out, ws.local, to_dict(cfg)))
        log.truncate_after(start)  # what an interrupted run logged past its checkpoint is trained (and logged) again
        if images.selection:
            write_selection(images, ws, PREFIX)
        print(f"{PREFIX} {sum(images.counts.values())} images in {len(images.counts)} shards, "
              f"{len(images.heldout)} held out; {world} ranks × {d.batch_size // world} images per step; "
              f"steps {start}..{end} of {d.steps}", flush=True)
    task = DVAETask(cfg, engine, images, rank, world, log, heldout_x)
    task.end, task.lease_check = end, lease_check
    engine.train()
    loop.run(task, loop.Cadence(start, end, d.log_every, d.save_every), log)
    task.prefetch.shutdown()
    if end < d.steps:
        if log is not None:
            print(f"{PREFIX} stopped after step {end} (dvae.stop_after_steps); checkpoint {out}/step{end:08d}",
                  flush=True)
            log.close()
            task.push_logs()
        return None
    return _finish(cfg, task, shape, size)


def _finish(cfg: Config, task: DVAETask, shape: DVAEShape, size: int) -> dict[str, Any] | None:
    """Rank 0: the consolidated weights ``dvae.safetensors``, the final held-out evaluation and ``metrics.json``."""
    d, out = cfg.dvae, task.out
    state = ds_seam.consolidated_state_dict(task.engine, d.zero_stage)
    if task.log is None or state is None:
        return None
    final = DVAE(shape)
    final.load_state_dict({k.removeprefix("dvae."): v for k, v in state.items()})
    final.eval()
    train_hist = read_metrics(task.ws.local, kind="train")
    elapsed = time.time() - task.t0
    result: dict[str, Any] = {
        "steps": d.steps, "final_loss": train_hist[-1]["loss"] if train_hist else None,
        "final_recon_mse": train_hist[-1]["recon_mse"] if train_hist else None,
        "ranks": task.world, "zero_stage": d.zero_stage, "train_images": task.images.train_images,
        "heldout_images": len(task.images.heldout), "vocab_size": d.vocab_size, "grid": shape.grid(size),
        "image_size": size, "shard_reads": task.images.cache.reads, "seconds": round(elapsed, 2),
        "images_per_s": task.seen / max(elapsed, 1e-9),
        **({"filter": {"filter": task.images.selection["filter"], **task.images.selection["counts"]}}
           if task.images.selection else {}),
    }
    if task.heldout_x is not None:
        result.update(task.evaluate(final, d.steps), recon_grid=join(out, f"recon_step{d.steps:06d}.png"))
    task.log.summary(result)
    task.log.close()
    task.push_logs()
    task.lease_check()
    save_dvae(final, join(out, DVAE_FILE), extra=result)
    local = task.ws.local
    doc = {"result": result, "history": read_metrics(local, kind="train"), "evals": read_metrics(local, kind="eval")}
    commit.write_text(join(out, "metrics.json"), json.dumps(doc))
    return result


def launch(cfg: Config) -> dict[str, Any]:
    """Train on ``dvae.num_procs`` ranks through the deepspeed launcher (each streams the committed image shards);
    the final result, or where it stopped (``dvae.stop_after_steps``: resumable, no weights yet)."""
    out = cfg.path("dvae")
    check_writable(out, "dvae.output")
    launcher = ranks.launch(cfg, cfg.dvae, out, "train-dvae", "pipeline.dvae.train", train, cfg.dvae.num_procs,
                            PREFIX)
    logger.info("train-dvae: %d ranks (%s launcher) into %s", cfg.dvae.num_procs, launcher, out)
    if not exists(join(out, "metrics.json")):
        last = read_metrics(out, kind="train")[-1:]
        return {"stopped_after_step": last[0]["step"] if last else 0, "steps": cfg.dvae.steps,
                "loss": last[0]["loss"] if last else None, "checkpoint": Checkpoints(out).latest()}
    return read_json(join(out, "metrics.json"))["result"]


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return rank_main(argv, __doc__ or "", train)


if __name__ == "__main__":
    main()
