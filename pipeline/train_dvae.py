"""Train the dVAE on the committed image shards (single process; stage one of DALL-E)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import shards
from pipeline.config import DVAEConfig
from pipeline.dvae import DVAE, DVAEShape, kl_weight_at, save_dvae, temperature_at
from pipeline.progress import Progress

log = logging.getLogger(__name__)


def load_image_array(images_folder: str, size: int, limit: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """All committed images as (N, S, S, 3) uint8, with their keys and captions."""
    keys, caps, arrs = [], [], []
    for key, caption, img in shards.iter_images(images_folder, size):
        keys.append(key)
        caps.append(caption)
        arrs.append(img)
        if limit and len(arrs) >= limit:
            break
    if not arrs:
        raise FileNotFoundError(f"{images_folder}: no committed images to train on")
    return np.stack(arrs), keys, caps


def dvae_shape(cfg: DVAEConfig) -> DVAEShape:
    return DVAEShape(vocab_size=cfg.vocab_size, n_hid=cfg.n_hid, group_count=cfg.group_count,
                     n_blk_per_group=cfg.n_blk_per_group, n_init=cfg.n_init, recon=cfg.recon)


def train_dvae(cfg: DVAEConfig, images: np.ndarray, out_dir: str, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    shape = dvae_shape(cfg)
    size = images.shape[1]
    if size % shape.downsample:
        raise ValueError(f"image size {size} is not divisible by the dVAE downsampling {shape.downsample}")
    model = DVAE(shape)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.05)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    gen = torch.Generator().manual_seed(seed)
    progress = Progress("train-dvae", total=cfg.steps, unit="steps")
    history: list[dict[str, float]] = []
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(data), (min(cfg.batch_size, len(data)),), generator=gen)
        tau = temperature_at(step, cfg.steps, cfg.temp_start, cfg.temp_end)
        loss, stats = model.loss(data[idx], tau, kl_weight_at(step, cfg.kl_warmup_steps, cfg.kl_weight),
                                 cfg.input_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append({"step": step + 1, "tau": tau, **stats})
        progress.update(1, f"loss {stats['loss']:.4f} mse {stats['recon_mse']:.4f} kl {stats['kl']:.3f} tau {tau:.3f}")
    progress.close()
    model.eval()
    with torch.no_grad():  # hard-code reconstruction error: what tokenize + decode will actually give
        probe = data[: min(256, len(data))]
        hard_mse = float(torch.mean((model.decode(model.encode(probe)) - probe) ** 2))
        used = int(torch.unique(model.encode(data[: min(1024, len(data))])).numel())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"steps": cfg.steps, "final_loss": float(np.mean([h["loss"] for h in history[-20:]])),
              "hard_recon_mse": hard_mse, "codes_used": used, "vocab_size": cfg.vocab_size,
              "grid": shape.grid(size), "image_size": size, "seconds": progress.elapsed}
    save_dvae(model, str(out / "dvae.pt"), extra=result)
    (out / "metrics.json").write_text(json.dumps({"result": result, "history": history}))
    log.info("dvae: hard-code recon mse %.5f, %d/%d codes used", hard_mse, used, cfg.vocab_size)
    return result
