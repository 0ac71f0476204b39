"""DALL-E's discrete VAE (stage one), laid out module for module like OpenAI's ``dall_e`` package.

Same structure and parameter names as ``dall_e.Encoder`` / ``dall_e.Decoder`` (``blocks.input``,
``blocks.group_N.block_M.res_path.conv_K``, ``blocks.output.conv``; only ``w``/``b`` are spelled ``weight``/``bias``),
so OpenAI's published ``encoder.pkl`` / ``decoder.pkl`` load into it (``pipeline.dvae.openai``) and give their tokens
exactly. Sizes are configurable (the demo's is tiny); at full size 256×256 images become a 32×32 grid of 8192 codes.

Training (stage one): the encoder's logits are relaxed with Gumbel-softmax at an annealed temperature, the decoder
predicts a distribution over pixels, and the posterior is pulled towards a uniform prior with a KL term. The
reconstruction cost is DALL-E's logit-Laplace on pixels mapped into (ε, 1-ε), or MSE, or binary cross-entropy.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import InputError
from pipeline.storage import weights

LOGIT_LAPLACE_EPS = 0.1
RECON_LOSSES = ("logit_laplace", "mse", "bce")


@dataclass(frozen=True)
class DVAEShape:
    vocab_size: int = 8192
    n_hid: int = 256
    group_count: int = 4
    n_blk_per_group: int = 2
    channels: int = 3
    n_init: int = 128
    """Width of the decoder's first (1×1) convolution; OpenAI's is 128."""
    recon: str = "logit_laplace"
    """How the decoder's output is read: logit_laplace (OpenAI's), mse or bce."""

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def grid(self, image_size: int) -> int:
        return image_size // self.downsample


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [ε, 1-ε], the encoder's input space (``dall_e.map_pixels``)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``map_pixels``, clamped to [0, 1] (``dall_e.unmap_pixels``)."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def _conv(n_in: int, n_out: int, kw: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, kw, padding=(kw - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * kw**2))  # OpenAI's initialisation
    nn.init.zeros_(conv.bias)
    return conv


class _Block(nn.Module):
    """Identity (or 1×1) path + post_gain · residual path. Encoder kernels 3,3,3,1; decoder kernels 1,3,3,3."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [(n_in, n_hid), (n_hid, n_hid), (n_hid, n_hid), (n_hid, n_out)]
        layers: list[tuple[str, nn.Module]] = []
        for i, ((a, b), k) in enumerate(zip(widths, kernels), start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", _conv(a, b, k))]
        self.res_path = nn.Sequential(OrderedDict(layers))
        self.post_gain = 1 / n_layers**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _widths(shape: DVAEShape) -> list[int]:
    return [shape.n_hid * 2 ** min(g, 3) for g in range(shape.group_count)]


def _groups(shape: DVAEShape, widths: list[int], n_in: int, kernels: tuple[int, int, int, int],
            resample: type[nn.Module], **resample_kw: object) -> list[tuple[str, nn.Module]]:
    n_layers = shape.group_count * shape.n_blk_per_group
    groups = []
    for g, width in enumerate(widths, start=1):
        blocks: list[tuple[str, nn.Module]] = []
        for i in range(shape.n_blk_per_group):
            blocks.append((f"block_{i + 1}", _Block(n_in, width, n_layers, kernels)))
            n_in = width
        if g < len(widths):
            blocks.append(("pool" if resample is nn.MaxPool2d else "upsample", resample(**resample_kw)))
        groups.append((f"group_{g}", nn.Sequential(OrderedDict(blocks))))
    return groups


class Encoder(nn.Module):
    """map_pixels(image) (B, C, H, W) → code logits (B, vocab, H/ds, W/ds)."""

    def __init__(self, shape: DVAEShape):
        super().__init__()
        widths = _widths(shape)
        self.blocks = nn.Sequential(OrderedDict([
            ("input", _conv(shape.channels, shape.n_hid, 7)),
            *_groups(shape, widths, shape.n_hid, (3, 3, 3, 1), nn.MaxPool2d, kernel_size=2),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _conv(widths[-1], shape.vocab_size,
                                                                                         1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """One-hot (or relaxed) codes (B, vocab, h, w) → pixel statistics (B, 2C, H, W): location logits, then log-scale."""

    def __init__(self, shape: DVAEShape):
        super().__init__()
        widths = list(reversed(_widths(shape)))
        self.blocks = nn.Sequential(OrderedDict([
            ("input", _conv(shape.vocab_size, shape.n_init, 1)),
            *_groups(shape, widths, shape.n_init, (1, 3, 3, 3), nn.Upsample, scale_factor=2, mode="nearest"),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _conv(widths[-1], 2 * shape.channels,
                                                                                         1))]))),
        ]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


class DVAE(nn.Module):
    def __init__(self, shape: DVAEShape):
        super().__init__()
        if shape.recon not in RECON_LOSSES:
            raise ValueError(f"dVAE recon must be one of {RECON_LOSSES}, got {shape.recon!r}")
        self.shape = shape
        self.encoder = Encoder(shape)
        self.decoder = Decoder(shape)

    def pixels(self, stats: torch.Tensor) -> torch.Tensor:
        """Decoder statistics → the image it predicts, in [0, 1]."""
        mu = torch.sigmoid(stats[:, : self.shape.channels])
        return unmap_pixels(mu) if self.shape.recon == "logit_laplace" else mu

    def recon_loss(self, stats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c = self.shape.channels
        if self.shape.recon == "mse":
            return F.mse_loss(torch.sigmoid(stats[:, :c]), x)
        if self.shape.recon == "bce":
            return F.binary_cross_entropy_with_logits(stats[:, :c], x)
        # logit-Laplace NLL of the mapped pixel y: |logit(y) - mu| / b + log(2 b y (1 - y))
        y = map_pixels(x)
        mu, ln_b = stats[:, :c], stats[:, c:].clamp(-8.0, 8.0)
        nll = (torch.logit(y) - mu).abs() * torch.exp(-ln_b) + ln_b + math.log(2.0) + torch.log(y * (1 - y))
        return nll.mean()

    def loss(self, x: torch.Tensor, temperature: float, kl_weight: float,
             input_noise: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Gumbel-softmax relaxed ELBO: reconstruction + kl_weight · KL(q(z|x) || uniform)."""
        inp = map_pixels(x)
        if input_noise > 0:  # denoising: the encoder sees a corrupted image, the decoder must give the clean one
            inp = inp + input_noise * torch.randn_like(inp)
        logits = self.encoder(inp)
        z = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)
        stats = self.decoder(z)
        rec = self.recon_loss(stats, x)
        log_q = F.log_softmax(logits, dim=1)
        # KL(q || U) = sum_k q_k (log q_k + log V), averaged over grid positions.
        kl = (log_q.exp() * (log_q + math.log(self.shape.vocab_size))).sum(1).mean()
        total = rec + kl_weight * kl
        with torch.no_grad():
            mse = F.mse_loss(self.pixels(stats), x)
        return total, {"loss": total.item(), "recon": rec.item(), "recon_mse": mse.item(), "kl": kl.item()}

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] → codes (B, h, w) int64: ``argmax(encoder(map_pixels(x)))``."""
        return self.encoder(map_pixels(x)).argmax(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) → images (B, C, H, W) in [0, 1]."""
        z = F.one_hot(codes.long(), self.shape.vocab_size).permute(0, 3, 1, 2).to(self.decoder.blocks.input.weight)
        return self.pixels(self.decoder(z).float())


def temperature_at(step: int, total: int, start: float, end: float) -> float:
    """Exponential anneal from ``start`` to ``end`` over ``total`` steps (DALL-E anneals τ to 1/16)."""
    frac = min(step / max(total - 1, 1), 1.0)
    return start * (end / start) ** frac


def kl_weight_at(step: int, warmup: int, weight: float) -> float:
    """Linear ramp of the KL weight from 0 over ``warmup`` steps (DALL-E ramps β up early in training)."""
    return weight if warmup <= 0 else weight * min(1.0, step / warmup)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise ValueError naming ``where`` and the first mismatches if ``state`` does not fit ``model``."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
             if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or wrong:
        raise InputError(f"{where}: weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"wrong size {wrong[:3]}")


DVAE_REEXPORT = ("Re-export it: rerun `python -m pipeline train-dvae` with the run's config (it resumes from the "
                 "newest complete checkpoint under dvae.output and writes dvae.safetensors without training further; "
                 "with dvae.weights=openai it imports OpenAI's files again)")


def save_dvae(model: DVAE, path: str, extra: dict | None = None) -> None:
    """``dvae.safetensors`` + ``dvae.json`` (kind, shape, ``extra``: provenance and figures), each written whole or
    not at all (a reader never sees half a checkpoint)."""
    weights.save_weights(path, model.state_dict(), {"kind": "dvae", "shape": asdict(model.shape),
                                                    "extra": extra or {}})


def load_dvae(path: str) -> DVAE:
    """Load a dVAE written by ``save_dvae`` (a path or a URL of the run's storage); the error names the file and the
    mismatch (an earlier version's ``dvae.pt`` is refused with how to re-export it)."""
    tensors, config = weights.load_weights(path, "dVAE", DVAE_REEXPORT)
    if config.get("kind") != "dvae":
        raise InputError(f"{path}: a {config.get('kind')!r} prior's weights, not a dVAE checkpoint "
                         f"({weights.DVAE_FILE})")
    try:
        model = DVAE(DVAEShape(**config["shape"]))
    except (TypeError, KeyError) as exc:
        where = weights.config_path(path)
        raise InputError(f"{where}: shape {config.get('shape')} is not a DVAEShape ({exc})") from exc
    weights.fit(model, tensors, path)
    return model.eval()
