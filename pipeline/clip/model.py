"""CLIP through open_clip: load any open_clip model (``ViT-B-32`` with a pretrained tag or file, or the run's own,
``local-dir:<folder>``) and encode images and captions with it. ``pipeline.clip.train`` trains the run's own.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

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


def clip_arch(cfg: Any) -> str:
    """The open_clip name of the run's CLIP: ``clip.model``, else the small one train-clip saves (``local-dir:``)."""
    import os

    from pipeline.storage.urls import is_local

    folder = cfg.path("clip")
    return cfg.clip.model or f"local-dir:{os.path.abspath(folder) if is_local(folder) else folder}"


def model_config(cfg: ClipConfig, image_size: int) -> dict[str, Any]:
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": cfg.layers, "width": cfg.width, "head_width": 32,
                       "patch_size": cfg.patch_size},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.width,
                     "heads": cfg.width // 32, "layers": cfg.layers},
    }


def load_clip(arch: str, pretrained: str = "") -> ClipBundle:
    """``arch`` is an open_clip name (``ViT-B-32``) or ``local-dir:<folder>``; ``pretrained`` a tag or file. The
    folder or file may be a URL (the run's storage): open_clip reads only local files, so it is staged through the
    node cache (``pipeline.storage.urls.local_copy``); ``arch`` and ``pretrained`` keep naming the URL."""
    from pipeline.storage.urls import is_local, local_copy

    local_arch, local_pretrained = arch, pretrained
    if arch.startswith("local-dir:") and not is_local(arch.removeprefix("local-dir:")):
        local_arch = "local-dir:" + local_copy(arch.removeprefix("local-dir:"))
    if pretrained and "://" in pretrained and not is_local(pretrained):
        local_pretrained = local_copy(pretrained)
    model, _, preprocess = open_clip.create_model_and_transforms(local_arch, pretrained=local_pretrained or None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(local_arch)
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
