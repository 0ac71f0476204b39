"""The train-clip stage: a small open_clip CLIP trained contrastively on the run's images, saved in open_clip's own
folder layout (``open_clip_config.json`` + ``open_clip_model.safetensors``) and loaded back through
``open_clip.create_model_and_transforms("local-dir:<folder>")``, the same code path that loads a published model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save_file

from pipeline.clip.model import ClipBundle, clip_arch, encode_images, encode_texts, load_clip, model_config
from pipeline.config import ClipConfig, Config
from pipeline.storage.commit import write_text
from pipeline.storage.urls import Workspace, join

log = logging.getLogger(__name__)


def run_train_clip(cfg: Config, images: np.ndarray | None = None,
                   captions: list[str] | None = None) -> dict[str, Any]:
    """Train the run's CLIP (skipped when ``clip.model`` names one) on ``images``/``captions`` (default: every committed
    image); its losses go to ``<clip>/metrics.json`` and its text→image top-1 among 64 distinct captions is reported."""
    from pipeline.dvae.data import load_image_array

    if cfg.clip.model:
        return {"skipped": f"using open_clip model {cfg.clip.model}"}
    if images is None or captions is None:
        images, _, captions = load_image_array(cfg.path("images"), cfg.download.image_size)
    result = train_clip(cfg.clip, images, captions, cfg.path("clip"), cfg.seed)
    losses = result.pop("losses")
    write_text(join(cfg.path("clip"), "metrics.json"), json.dumps({"losses": losses}))
    bundle = load_clip(clip_arch(cfg))
    uniq: dict[str, int] = {}
    for i, c in enumerate(captions):
        uniq.setdefault(c, i)
    pick = list(uniq.values())[:64]
    result["retrieval_top1_64"] = retrieval_accuracy(bundle, images[pick], [captions[i] for i in pick])
    _track(cfg, losses, result)
    return result


def _track(cfg: Config, losses: list[float], result: dict[str, Any]) -> None:
    """The per-step contrastive losses metrics.json records, to W&B when ``logging.wandb`` is set (CLIP trains in
    one process, in seconds: they are sent once it is done)."""
    from pipeline.config import to_dict
    from pipeline.training import tracking

    run = tracking.open_run(cfg.logging.wandb, "train-clip", cfg.path("clip"),
                            Workspace(cfg.path("clip"), role="wandb").local, to_dict(cfg))
    if run is None:
        return
    for step, loss in enumerate(losses, 1):
        run.log({"train/loss": loss}, step)
    run.summary({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.finish()


def train_clip(cfg: ClipConfig, images: np.ndarray, captions: list[str], out_dir: str, seed: int) -> dict[str, Any]:
    """Contrastively train a small open_clip CLIP on (images, captions); save it in open_clip's folder layout."""
    torch.manual_seed(seed)
    size = images.shape[1]
    mcfg = model_config(cfg, size)
    model = open_clip.model.CLIP(**mcfg, output_dict=True)
    tokenizer = open_clip.tokenize  # CLIP's BPE, the tokenizer the saved folder names
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    all_tokens = tokenizer(captions, context_length=cfg.context_length)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 5%
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))))
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(images), (min(cfg.batch_size, len(images)),), generator=gen)
        x = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 255.0
        out = model((x - mean) / std, all_tokens[idx])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("clip step %d/%d loss %.4f (%.1f steps/s)", step + 1, cfg.steps, losses[-1],
                     (step + 1) / (time.time() - t0))
    ws = Workspace(out_dir)  # open_clip's folder layout, written locally then put in the run's storage
    out = Path(ws.local)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    preprocess = {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": mcfg, "preprocess_cfg": preprocess}, indent=1))
    ws.push("open_clip_model.safetensors", "open_clip_config.json")
    return {"steps": cfg.steps, "final_loss": float(np.mean(losses[-20:])), "losses": losses,
            "seconds": time.time() - t0}


def retrieval_accuracy(bundle: ClipBundle, images: np.ndarray, captions: list[str]) -> float:
    """Text→image top-1 accuracy among the given pairs (captions assumed distinct)."""
    img = encode_images(bundle, images)
    txt = encode_texts(bundle, captions)
    return float(((txt @ img.T).argmax(1) == np.arange(len(captions))).mean())
