"""Gaussian diffusion math shared by every diffusion model here (DALL-E 2's prior over CLIP embeddings and its
decoder over pixels): the cosine noise schedule, timestep features, the respaced reverse chain and its DDPM / DDIM
steps. Models supply only their x0 prediction; everything about the chain is here, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

SAMPLERS = ("ddim", "ddpm")


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) / ᾱ(0); β_t = 1 − ᾱ_t/ᾱ_{t−1}, clipped to
    0.999 so the last steps stay invertible. float64: ᾱ near the ends needs the precision."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    acp = torch.cos((x / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    acp = acp / acp[0]
    return (1 - acp[1:] / acp[:-1]).clamp(0.0, 0.999)


@lru_cache(maxsize=8)
def alphas_cumprod(timesteps: int) -> torch.Tensor:
    """ᾱ_t, float64. Kept off modules (no buffer): a bf16/fp16 engine casts buffers, and ᾱ close to 1 would round
    to 1."""
    return torch.cumprod(1 - cosine_betas(timesteps), dim=0)


def scaled(emb: torch.Tensor) -> torch.Tensor:
    """Raw CLIP embeddings (any scale, any float dtype) → float32, l2-normalised, × sqrt(D): about unit variance per
    dimension, like the Gaussian noise they are mixed with (as in LAION's DALLE2-pytorch)."""
    return F.normalize(emb.float(), dim=-1) * math.sqrt(emb.shape[-1])


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal features of integer timesteps, (B,) → (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([args.sin(), args.cos()], dim=-1), (0, dim - 2 * half))


def respaced(timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly strided from T−1 down to 0 (a respaced schedule)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps: must be in [1, {timesteps}], got {steps}")
    return torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def check_sampler(sampler: str, eta: float) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


def ddpm_step(x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | float, a_t: float, a_prev: float,
              eta: float) -> torch.Tensor:
    """Ancestral step: a sample of q(x_prev | x_t, x0), the posterior of the respaced chain (β = 1 − ᾱ_t/ᾱ_prev)."""
    beta = 1 - a_t / a_prev
    mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
    return mean + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * noise


def ddim_step(x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | float, a_t: float, a_prev: float,
              eta: float) -> torch.Tensor:
    """DDIM (Song et al. 2021): re-noise x0 toward ᾱ_prev along the implied ε; eta = 0 is deterministic."""
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps + sigma * noise


def reverse_diffusion(shape: tuple[int, ...], x0_of: Callable[[torch.Tensor, int], torch.Tensor], timesteps: int,
                      steps: int, sampler: str, eta: float, generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
    """The reverse chain from pure noise of ``shape`` over ``steps`` respaced timesteps; ``x0_of(x, t)`` is the
    model's (guided, post-processed) x0 prediction at integer timestep t. Returns the last step's x0 prediction.

    Noise is drawn from ``generator`` on its own device (the global CPU RNG when None) and moved to ``device``; both
    samplers draw the same noise sequence, so DDPM equals DDIM at eta=1 step for step."""
    check_sampler(sampler, eta)
    g = generator.device if generator is not None else torch.device("cpu")
    acp = alphas_cumprod(timesteps)
    times = respaced(timesteps, steps)
    x = torch.randn(shape, generator=generator, device=g).to(device)
    x0 = x
    step = ddpm_step if sampler == "ddpm" else ddim_step
    for i, t in enumerate(times):
        x0 = x0_of(x, t)
        if i + 1 < len(times):  # the last step returns its x0 prediction itself
            a_t, a_prev = float(acp[t]), float(acp[times[i + 1]])
            stochastic = sampler == "ddpm" or eta > 0
            noise = torch.randn(shape, generator=generator, device=g).to(device) if stochastic else 0.0
            x = step(x, x0, noise, a_t, a_prev, eta)
    return x0
