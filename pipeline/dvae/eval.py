"""``python -m pipeline eval-dvae``: score a dVAE (ours, or OpenAI's once imported) on held-out images.

The held-out set is the one training never sees (``dvae_data.choose_heldout``: seeded by the run's seed), so the
figures are comparable with the ones training writes: hard-code reconstruction MSE and PSNR (encode → codes →
decode, what tokenize and sample give), constant-image baselines, codebook perplexity and dead codes, and a PNG of
originals above reconstructions.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import Config
from pipeline.dvae.data import ShardCache, choose_heldout, shard_counts
from pipeline.dvae.model import DVAE, DVAE_REEXPORT, load_dvae
from pipeline.errors import ConfigError, DataError
from pipeline.storage.commit import atomic_output, write_text
from pipeline.storage.urls import join
from pipeline.storage.weights import DVAE_FILE, require, saved


@torch.no_grad()
def evaluate(model: DVAE, images: torch.Tensor, batch: int = 64) -> tuple[dict[str, Any], torch.Tensor]:
    """Hard-code reconstructions (encode → codes → decode: what tokenize + sample give) of held-out images.

    Returns the figures and the reconstructions. PSNR is of the mean MSE over the set; perplexity is exp of the
    entropy of the code histogram over every held-out grid position; a dead code is one no held-out image uses.
    Baselines: ``constant_baseline_mse`` predicts one constant image for every input (the held-out set's own mean
    image, the best constant there is); ``flat_colour_baseline_mse`` predicts each image's own mean colour.
    """
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    codes, recons = [], []
    for i in range(0, len(images), batch):
        x = images[i: i + batch].to(next(model.parameters()).device)
        c = model.encode(x.to(dtype))
        codes.append(c.cpu())
        recons.append(model.decode(c).float().clamp(0, 1).cpu())
    model.train(was_training)
    codes_all, rec = torch.cat(codes), torch.cat(recons)
    x = images.float()
    mse = float(torch.mean((rec - x) ** 2))
    hist = torch.bincount(codes_all.flatten(), minlength=model.shape.vocab_size).double()
    p = hist[hist > 0] / hist.sum()
    used = int((hist > 0).sum())
    return {"heldout_mse": mse, "heldout_psnr": psnr(mse),
            "constant_baseline_mse": float(torch.mean((x.mean(0, keepdim=True) - x) ** 2)),
            "flat_colour_baseline_mse": float(torch.mean((x.mean(dim=(2, 3), keepdim=True) - x) ** 2)),
            "perplexity": float(torch.exp(-(p * p.log()).sum())), "codes_used": used,
            "dead_codes": model.shape.vocab_size - used}, rec


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def write_grid(originals: torch.Tensor, recons: torch.Tensor, path: str, max_images: int = 16) -> None:
    """Held-out originals in the top row, their reconstructions below, upscaled to at least 64 px."""
    n = min(max_images, len(originals))
    size = originals.shape[-1]
    scale, pad = max(1, 64 // size), 2
    cell = size * scale
    grid = Image.new("RGB", (n * (cell + pad) + pad, 2 * (cell + pad) + pad), (255, 255, 255))
    for row, imgs in enumerate((originals, recons)):
        for i in range(n):
            arr = (imgs[i].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (pad + i * (cell + pad), pad + row * (cell + pad)))
    with atomic_output(path) as f:
        grid.save(f, format="PNG")


def eval_dvae(cfg: Config) -> dict[str, Any]:
    t0 = time.time()
    out = cfg.path("dvae")
    ckpt = join(out, DVAE_FILE)
    if not saved(ckpt) and cfg.dvae.weights:  # e.g. OpenAI's files: import them into our layout first
        from pipeline.dvae.openai import import_weights

        import_weights(cfg)
    require(ckpt, f"{ckpt}: no dVAE to evaluate (run train-dvae, or set dvae.weights)", DVAE_REEXPORT)
    model = load_dvae(ckpt)
    size = cfg.download.image_size
    if size % model.shape.downsample:
        raise ConfigError(f"{ckpt}: image size {size} is not divisible by the dVAE's downsampling "
                         f"{model.shape.downsample}")
    folder = cfg.path("images")
    counts = shard_counts(folder)
    rows = choose_heldout(counts, max(cfg.dvae.heldout_images, 1), cfg.seed)
    if not rows:
        raise DataError(f"{folder}: too few images to hold any out (have {sum(counts.values())})")
    images = ShardCache(folder, counts, size, capacity=4).images(np.asarray(rows))
    figures, recons = evaluate(model, images)
    grid = join(out, "eval_reconstructions.png")
    write_grid(images, recons, grid)
    result = {**figures, "heldout_images": len(rows), "image_size": size, "grid": model.shape.grid(size),
              "vocab_size": model.shape.vocab_size, "recon": model.shape.recon, "checkpoint": ckpt,
              "reconstructions_png": grid, "seconds": round(time.time() - t0, 2)}
    write_text(join(out, "eval.json"), json.dumps(result, indent=1))
    return result
