"""``python -m pipeline eval-dvae``: score a dVAE (ours, or OpenAI's once imported) on held-out images.

The held-out set is the one training never sees (``train_dvae.choose_heldout``: seeded by the run's seed), so the
figures are comparable with the ones training writes: hard-code reconstruction MSE and PSNR (encode → codes →
decode, what tokenize and sample give), constant-image baselines, codebook perplexity and dead codes, and a PNG of
originals above reconstructions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.dvae import load_dvae
from pipeline.train_dvae import ShardCache, choose_heldout, evaluate, shard_counts, write_grid


def eval_dvae(cfg: Config) -> dict[str, Any]:
    t0 = time.time()
    out = Path(cfg.path("dvae"))
    ckpt = out / "dvae.pt"
    if not ckpt.exists() and cfg.dvae.weights:  # e.g. OpenAI's files: import them into our layout first
        from pipeline.dvae_openai import import_weights

        import_weights(cfg)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no dVAE to evaluate (run train-dvae, or set dvae.weights)")
    model = load_dvae(str(ckpt))
    size = cfg.download.image_size
    if size % model.shape.downsample:
        raise ValueError(f"{ckpt}: image size {size} is not divisible by the dVAE's downsampling "
                         f"{model.shape.downsample}")
    folder = cfg.path("images")
    counts = shard_counts(folder)
    rows = choose_heldout(counts, max(cfg.dvae.heldout_images, 1), cfg.seed)
    if not rows:
        raise ValueError(f"{folder}: too few images to hold any out (have {sum(counts.values())})")
    images = ShardCache(folder, counts, size, capacity=4).images(np.asarray(rows))
    figures, recons = evaluate(model, images)
    grid = out / "eval_reconstructions.png"
    write_grid(images, recons, str(grid))
    result = {**figures, "heldout_images": len(rows), "image_size": size, "grid": model.shape.grid(size),
              "vocab_size": model.shape.vocab_size, "recon": model.shape.recon, "checkpoint": str(ckpt),
              "reconstructions_png": str(grid), "seconds": round(time.time() - t0, 2)}
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    return result
