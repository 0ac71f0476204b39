"""DALL-E's discrete VAE (stage one), written as single-device model code.

The layout follows the published DALL-E encoder/decoder: an input conv, ``group_count`` groups of residual blocks
(widths n_hid·1, ·2, ·4, ·8…) with a 2× max-pool between groups, then a 1×1 conv to ``vocab_size`` logits. The decoder
mirrors it with nearest-neighbour upsampling. Training relaxes the categorical codes with Gumbel-softmax and pulls the
posterior towards a uniform prior with a KL term.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DVAEShape:
    vocab_size: int = 8192
    n_hid: int = 256
    group_count: int = 4
    n_blk_per_group: int = 2
    channels: int = 3

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def grid(self, image_size: int) -> int:
        return image_size // self.downsample


class _Block(nn.Module):
    """Identity path plus a gain-scaled residual path (relu→3x3→relu→3x3→relu→3x3→relu→1x1)."""

    def __init__(self, n_in: int, n_out: int, post_gain: float):
        super().__init__()
        hid = max(n_out // 4, 1)
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), nn.Conv2d(n_in, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, n_out, 1),
        )
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _widths(shape: DVAEShape) -> list[int]:
    return [shape.n_hid * 2 ** min(g, 3) for g in range(shape.group_count)]


class Encoder(nn.Module):
    def __init__(self, shape: DVAEShape):
        super().__init__()
        gain = 1.0 / (shape.group_count * shape.n_blk_per_group) ** 2
        layers: list[nn.Module] = [nn.Conv2d(shape.channels, shape.n_hid, 7, padding=3)]
        n_in = shape.n_hid
        for g, width in enumerate(_widths(shape)):
            for _ in range(shape.n_blk_per_group):
                layers.append(_Block(n_in, width, gain))
                n_in = width
            if g < shape.group_count - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(n_in, shape.vocab_size, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → code logits (B, vocab, H/ds, W/ds)."""
        return self.blocks(x * 2.0 - 1.0)


class Decoder(nn.Module):
    def __init__(self, shape: DVAEShape):
        super().__init__()
        gain = 1.0 / (shape.group_count * shape.n_blk_per_group) ** 2
        widths = list(reversed(_widths(shape)))
        layers: list[nn.Module] = [nn.Conv2d(shape.vocab_size, widths[0] // 2, 1)]
        n_in = widths[0] // 2
        for g, width in enumerate(widths):
            for _ in range(shape.n_blk_per_group):
                layers.append(_Block(n_in, width, gain))
                n_in = width
            if g < shape.group_count - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), nn.Conv2d(n_in, shape.channels, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, vocab, h, w) one-hot or relaxed codes → image (B, 3, H, W) in [0, 1]."""
        return torch.sigmoid(self.blocks(z))


class DVAE(nn.Module):
    def __init__(self, shape: DVAEShape):
        super().__init__()
        self.shape = shape
        self.encoder = Encoder(shape)
        self.decoder = Decoder(shape)

    def loss(self, x: torch.Tensor, temperature: float, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Gumbel-softmax relaxed ELBO: reconstruction + kl_weight · KL(q(z|x) || uniform)."""
        logits = self.encoder(x)  # (B, V, h, w)
        z = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)
        recon = self.decoder(z)
        rec = F.mse_loss(recon, x)
        log_q = F.log_softmax(logits, dim=1)
        # KL(q || U) = sum_k q_k (log q_k + log V), averaged over grid positions.
        kl = (log_q.exp() * (log_q + math.log(self.shape.vocab_size))).sum(1).mean()
        total = rec + kl_weight * kl
        return total, {"loss": total.item(), "recon_mse": rec.item(), "kl": kl.item()}

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → codes (B, h, w) int64."""
        return self.encoder(x).argmax(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) → images (B, 3, H, W) in [0, 1]."""
        z = F.one_hot(codes.long(), self.shape.vocab_size).permute(0, 3, 1, 2).float()
        return self.decoder(z)


def temperature_at(step: int, total: int, start: float, end: float) -> float:
    """Exponential anneal from ``start`` to ``end`` over ``total`` steps (DALL-E anneals τ to 1/16)."""
    frac = min(step / max(total - 1, 1), 1.0)
    return start * (end / start) ** frac


def save_dvae(model: DVAE, path: str, extra: dict | None = None) -> None:
    torch.save({"shape": asdict(model.shape), "state_dict": model.state_dict(), "extra": extra or {}}, path)


def load_dvae(path: str) -> DVAE:
    """Load a checkpoint written by ``save_dvae``; the error names the file if it is not one."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = DVAE(DVAEShape(**blob["shape"]))
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError, OSError) as exc:
        raise ValueError(f"{path}: not a dVAE checkpoint written by this pipeline ({exc})") from exc
    return model.eval()
