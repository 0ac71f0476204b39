"""CLIP through open_clip: load any open_clip model, or train a small one on the run's own images.

A trained model is saved in open_clip's own folder layout (``open_clip_config.json`` + ``open_clip_model.safetensors``)
and loaded back through ``open_clip.create_model_and_transforms("local-dir:<folder>")``, the same code path that loads
a published model. Named models (``ViT-B-32`` with a pretrained tag or file) load through the same function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import save_file

from pipeline.config import ClipConfig

log = logging.getLogger(__name__)


@dataclass
class ClipBundle:
    model: torch.nn.Module
    tokenizer: Any
    image_size: int
    mean: torch.Tensor  # (3, 1, 1)
    std: torch.Tensor
    arch: str
    pretrained: str
    weights_sha256: str

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])


def model_config(cfg: ClipConfig, image_size: int) -> dict[str, Any]:
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": cfg.layers, "width": cfg.width, "head_width": 32,
                       "patch_size": cfg.patch_size},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.width,
                     "heads": cfg.width // 32, "layers": cfg.layers},
    }


def load_clip(arch: str, pretrained: str = "") -> ClipBundle:
    """``arch`` is an open_clip name (``ViT-B-32``) or ``local-dir:<folder>``; ``pretrained`` a tag or file."""
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return ClipBundle(model, tokenizer, size, mean, std, arch, pretrained, h.hexdigest())


def image_input(bundle: ClipBundle, images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 → normalised (B, 3, S, S) float at the model's resolution."""
    device = next(bundle.model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != bundle.image_size or x.shape[-2] != bundle.image_size:
        # The model's own transform is Resize(bicubic) + CenterCrop on PIL images; our inputs are already square
        # crops, so this is the same resize, antialiased like PIL's.
        x = F.interpolate(x, size=(bundle.image_size, bundle.image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp_(0, 1)
    return (x - bundle.mean.to(device)) / bundle.std.to(device)


@torch.inference_mode()  # no autograd bookkeeping at all: a few % faster than no_grad on CPU
def encode_images(bundle: ClipBundle, images: np.ndarray) -> np.ndarray:
    """L2-normalised image embeddings, (B, D) float32."""
    with _autocast(bundle):
        emb = bundle.model.encode_image(image_input(bundle, images))
    return F.normalize(emb.float(), dim=-1).cpu().numpy()


@torch.inference_mode()
def encode_texts(bundle: ClipBundle, captions: list[str]) -> np.ndarray:
    """L2-normalised text embeddings, (B, D) float32."""
    device = next(bundle.model.parameters()).device
    with _autocast(bundle):
        emb = bundle.model.encode_text(bundle.tokenizer(captions).to(device))
    return F.normalize(emb.float(), dim=-1).cpu().numpy()


def _autocast(bundle: ClipBundle):
    """bf16 on a GPU (where it is fast and the embeddings are stored as fp16 anyway); exact fp32 on the CPU."""
    device = next(bundle.model.parameters()).device
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    preprocess = {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": mcfg, "preprocess_cfg": preprocess}, indent=1))
    return {"steps": cfg.steps, "final_loss": float(np.mean(losses[-20:])), "losses": losses,
            "seconds": time.time() - t0}


def retrieval_accuracy(bundle: ClipBundle, images: np.ndarray, captions: list[str]) -> float:
    """Text→image top-1 accuracy among the given pairs (captions assumed distinct)."""
    img = encode_images(bundle, images)
    txt = encode_texts(bundle, captions)
    return float(((txt @ img.T).argmax(1) == np.arange(len(captions))).mean())
