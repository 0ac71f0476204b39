"""DALL-E 2's diffusion prior: a causal transformer that denoises a CLIP image embedding given the caption.

One decoder-only transformer (pre-LN blocks, SDPA ``is_causal``, as in ``pipeline.prior.transformer``) reads the
sequence ``[caption tokens (text_len) ; CLIP text embedding ; timestep ; noised image embedding ; learned query]`` and
the output at the final query, projected to ``embed_dim``, is the predicted *unnoised* image embedding x0 (DALL-E 2
predicts x0 directly rather than the noise). Embeddings live in "scaled" space, l2-normalised then × sqrt(D), so each
dimension has about unit variance like the Gaussian noise they are mixed with (as in LAION's DALLE2-pytorch).

Training: ``loss_parts`` (MSE on x0, cosine noise schedule, conditioning dropout to a learned null text embedding).
Sampling: ``sample`` with DDPM (ancestral, respaced) or DDIM, classifier-free guidance, and best-of-k candidates by
cosine to the text embedding. The schedule, the reverse chain and the weights' EMA are ``pipeline.training``'s,
shared with the decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.prior.transformer import empty_captions
from pipeline.training.diffusion import (
    SAMPLERS,
    alphas_cumprod,
    cosine_betas,
    reverse_diffusion,
    scaled,
    timestep_features,
)
from pipeline.training.ema import EMA

# The schedule, the chain and the EMA are shared with the decoder (pipeline.training); re-exported for callers here.
__all__ = ["EMA", "SAMPLERS", "DiffusionPrior", "DiffusionShape", "cosine_betas", "empty_caption", "scaled",
           "timestep_features"]
N_EXTRA = 4  # sequence slots after the caption: text embedding, timestep, noised embedding, query
empty_caption = empty_captions  # the diffusion prior uses the same per-position pads as the DALL-E 1 prior


@dataclass(frozen=True)
class DiffusionShape:
    text_vocab: int
    text_len: int
    embed_dim: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    timesteps: int = 1000

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "dropout" and not getattr(self, f.name) > 0:
                raise ValueError(f"DiffusionShape.{f.name}: must be > 0, got {getattr(self, f.name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"DiffusionShape.n_embd: {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DiffusionShape.dropout: must be in [0, 1), got {self.dropout}")

    @property
    def seq_len(self) -> int:
        return self.text_len + N_EXTRA


class Block(nn.Module):
    """Pre-LN transformer block with causal SDPA (kept local: ``pipeline.prior.transformer.Block`` is tied to
    PriorShape)."""

    def __init__(self, s: DiffusionShape):
        super().__init__()
        self.n_head, self.dropout = s.n_head, s.dropout
        self.ln1 = nn.LayerNorm(s.n_embd)
        self.qkv = nn.Linear(s.n_embd, 3 * s.n_embd)
        self.proj = nn.Linear(s.n_embd, s.n_embd)
        self.ln2 = nn.LayerNorm(s.n_embd)
        self.mlp = nn.Sequential(nn.Linear(s.n_embd, 4 * s.n_embd), nn.GELU(), nn.Linear(4 * s.n_embd, s.n_embd),
                                 nn.Dropout(s.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class DiffusionPrior(nn.Module):
    def __init__(self, shape: DiffusionShape, activation_checkpointing: bool = False):
        super().__init__()
        s, C = shape, shape.n_embd
        self.shape = shape
        self.activation_checkpointing = activation_checkpointing
        self.token_emb = nn.Embedding(s.text_vocab + s.text_len, C)  # + per-position pad tokens
        self.pos_emb = nn.Embedding(s.seq_len, C)
        self.text_proj = nn.Linear(s.embed_dim, C)
        self.noised_proj = nn.Linear(s.embed_dim, C)
        self.time_mlp = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, C))
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.out_proj = nn.Linear(C, s.embed_dim)
        self.apply(self._init)
        self.query = nn.Parameter(torch.randn(C) * 0.02)
        # Lives in scaled space (unit variance per dim), like the text embeddings it stands in for.
        self.null_text_emb = nn.Parameter(torch.randn(s.embed_dim))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden_states(self, text: torch.Tensor, text_emb: torch.Tensor, noised: torch.Tensor, t: torch.Tensor,
                      drop: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the last block, (B, text_len + 4, n_embd) (exposed for causality tests)."""
        s, B, dt = self.shape, text.shape[0], self.query.dtype
        text_emb = text_emb.to(dt)  # inputs arrive as float32; a bf16/fp16 engine holds half weights
        if drop is not None:
            drop = drop.to(text.device, torch.bool)[:, None]
            text = torch.where(drop, empty_captions(1, s.text_len, s.text_vocab, text.device), text)
            text_emb = torch.where(drop, self.null_text_emb.to(dt), text_emb)
        x = torch.cat([self.token_emb(text), self.text_proj(text_emb)[:, None],
                       self.time_mlp(timestep_features(t, s.n_embd).to(dt))[:, None],
                       self.noised_proj(noised.to(dt))[:, None], self.query.expand(B, 1, -1)], dim=1)
        x = x + self.pos_emb(torch.arange(s.seq_len, device=text.device))
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, text: torch.Tensor, text_emb: torch.Tensor, noised: torch.Tensor, t: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """text (B, T) padded ids, text_emb / noised (B, D) scaled, t (B,) → predicted x0 (B, D), scaled space.
        ``drop[i]``: row i sees the empty caption and ``null_text_emb`` instead (unconditional)."""
        h = self.hidden_states(text, text_emb, noised, t, drop)
        return self.out_proj(self.ln_f(h[:, -1]))

    def _draw(self, batch: int, cond_drop: float, generator: torch.Generator | None,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """t, noise, drop from ``generator`` in a fixed order (None: the global CPU RNG), moved to ``device``."""
        g = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.shape.timesteps, (batch,), generator=generator, device=g)
        noise = torch.randn(batch, self.shape.embed_dim, generator=generator, device=g)
        drop = torch.rand(batch, generator=generator, device=g) < cond_drop if cond_drop > 0 else None
        return t.to(device), noise.to(device), None if drop is None else drop.to(device)

    def loss_parts(self, text: torch.Tensor, text_emb: torch.Tensor, image_emb: torch.Tensor,
                   valid: torch.Tensor | None = None, cond_drop: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(MSE between predicted and true x0 over valid rows, {"mse", "cos", "valid"}); raw CLIP embeddings in."""
        if not 0.0 <= cond_drop < 1.0:
            raise ValueError(f"cond_drop: a probability in [0, 1), got {cond_drop}")
        s, B, dev = self.shape, text.shape[0], text.device
        valid = torch.ones(B, dtype=torch.bool, device=dev) if valid is None else valid.to(dev, torch.bool)
        # Invalid rows (a missing embedding: zeros, NaN, junk ids) are blanked before the forward: masking only the
        # loss would still let NaN reach the weight gradients through 0 · NaN in the backward pass.
        v = valid[:, None]
        x0 = torch.where(v, scaled(image_emb), 0.0)
        cond = torch.where(v, scaled(text_emb), 0.0)
        text = torch.where(v, text, empty_captions(1, s.text_len, s.text_vocab, dev))
        t, noise, drop = self._draw(B, cond_drop, generator, dev)
        a = alphas_cumprod(s.timesteps).float().to(dev)[t][:, None]  # float32: no float64 on some devices
        pred = self(text, cond, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, drop).float()
        n = valid.sum()
        # No branch on "any valid row": an all-invalid batch gives an exact 0 whose backward still runs.
        loss = torch.where(valid, ((pred - x0) ** 2).mean(-1), 0.0).sum() / n.clamp(min=1)
        cos = torch.where(valid, F.cosine_similarity(pred.detach(), x0, dim=-1), 0.0).sum() / n.clamp(min=1)
        return loss, {"mse": float(loss.detach()), "cos": float(cos), "valid": float(n)}

    def _guided_x0(self, text: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                   guidance_scale: float) -> torch.Tensor:
        """x0 prediction; guidance_scale s != 1: uncond + s · (cond − uncond), both halves in one 2B batch."""
        if guidance_scale == 1.0:
            return self(text, cond, x, t).float()
        B = text.shape[0]
        drop = torch.arange(2 * B, device=text.device) >= B
        out = self(text.repeat(2, 1), cond.repeat(2, 1), x.repeat(2, 1), t.repeat(2), drop).float()
        cond_x0, uncond_x0 = out[:B], out[B:]
        return uncond_x0 + guidance_scale * (cond_x0 - uncond_x0)

    def _sample_loop(self, text: torch.Tensor, cond: torch.Tensor, steps: int, sampler: str, guidance_scale: float,
                     eta: float, generator: torch.Generator | None, renorm_x0: bool) -> torch.Tensor:
        """Reverse diffusion (``pipeline.training.diffusion``) from noise to an x0 prediction, (B, D)."""
        B, D, dev = text.shape[0], self.shape.embed_dim, text.device

        def x0_of(x: torch.Tensor, t: int) -> torch.Tensor:
            x0 = self._guided_x0(text, cond, x, torch.full((B,), t, device=dev), guidance_scale)
            return F.normalize(x0, dim=-1) * math.sqrt(D) if renorm_x0 else x0

        return reverse_diffusion((B, D), x0_of, self.shape.timesteps, steps, sampler, eta, generator, dev)

    @torch.no_grad()
    def sample(self, text: torch.Tensor, text_emb: torch.Tensor, steps: int = 64, sampler: str = "ddim",
               guidance_scale: float = 1.0, eta: float = 0.0, candidates: int = 1,
               generator: torch.Generator | None = None, renorm_x0: bool = True) -> torch.Tensor:
        """Image embeddings (B, D), unit norm, for padded captions (B, T) and raw CLIP text embeddings (B, D).

        ``renorm_x0``: put each step's x0 prediction back on the sphere of radius sqrt(D) where the data lives
        (DALLE2-pytorch's ``sampling_clamp_l2norm``). At high noise the MSE-optimal x0 is a posterior mean, shrunk
        toward the origin, and guidance can overshoot; projecting plays the role of clipping x0 to [-1, 1] for
        pixels. ``candidates`` k > 1: draw k per row and keep the one with the highest cosine to the text
        embedding (DALL-E 2). Runs in eval mode (no dropout), restoring the training flag after.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if not 1 <= steps <= self.shape.timesteps:
            raise ValueError(f"steps: must be in [1, {self.shape.timesteps}], got {steps}")
        if candidates < 1 or eta < 0:
            raise ValueError(f"candidates must be >= 1 and eta >= 0, got {candidates} and {eta}")
        B, k = text.shape[0], candidates
        was_training = self.training
        self.eval()
        try:
            cond = scaled(text_emb).repeat_interleave(k, dim=0)
            x0 = self._sample_loop(text.repeat_interleave(k, dim=0), cond, steps, sampler, guidance_scale, eta,
                                   generator, renorm_x0)
        finally:
            self.train(was_training)
        out = F.normalize(x0, dim=-1)
        if k == 1:
            return out
        score = (out * F.normalize(cond, dim=-1)).sum(-1).view(B, k)
        return out.view(B, k, -1)[torch.arange(B, device=out.device), score.argmax(dim=1)]

