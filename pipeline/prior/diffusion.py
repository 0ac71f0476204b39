"""DALL-E 2's diffusion prior: a causal transformer that denoises a CLIP image embedding given the caption.

One decoder-only transformer (pre-LN blocks, SDPA ``is_causal``, as in ``pipeline.prior.transformer``) reads the
sequence ``[caption tokens (text_len) ; CLIP text embedding ; timestep ; noised image embedding ; learned query]`` and
the output at the final query, projected to ``embed_dim``, is the predicted *unnoised* image embedding x0 (DALL-E 2
predicts x0 directly rather than the noise). Embeddings live in "scaled" space, l2-normalised then × sqrt(D), so each
dimension has about unit variance like the Gaussian noise they are mixed with (as in LAION's DALLE2-pytorch).

Training: ``loss_parts`` (MSE on x0, cosine noise schedule, conditioning dropout to a learned null text embedding).
Sampling: ``sample`` with DDPM (ancestral, respaced) or DDIM, classifier-free guidance, and best-of-k candidates by
cosine to the text embedding. ``EMA`` keeps an exponential moving average of the weights as module buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.prior.transformer import empty_captions

SAMPLERS = ("ddim", "ddpm")
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


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) / ᾱ(0); β_t = 1 − ᾱ_t/ᾱ_{t−1}, clipped to
    0.999 so the last steps stay invertible. float64: ᾱ near the ends needs the precision."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    acp = torch.cos((x / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    acp = acp / acp[0]
    return (1 - acp[1:] / acp[:-1]).clamp(0.0, 0.999)


@lru_cache(maxsize=8)
def _alphas_cumprod(timesteps: int) -> torch.Tensor:
    # Kept off the module (no buffer): a bf16/fp16 engine casts buffers, and ᾱ close to 1 would round to 1.
    return torch.cumprod(1 - cosine_betas(timesteps), dim=0)


def scaled(emb: torch.Tensor) -> torch.Tensor:
    """Raw CLIP embeddings (any scale, any float dtype) → float32, l2-normalised, × sqrt(D)."""
    return F.normalize(emb.float(), dim=-1) * math.sqrt(emb.shape[-1])


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal features of integer timesteps, (B,) → (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([args.sin(), args.cos()], dim=-1), (0, dim - 2 * half))


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
        a = _alphas_cumprod(s.timesteps).float().to(dev)[t][:, None]  # float32: no float64 on some devices
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
        """Reverse diffusion over ``steps`` timesteps evenly strided from T−1 down to 0 (a respaced schedule)."""
        B, D, dev = text.shape[0], self.shape.embed_dim, text.device
        g = generator.device if generator is not None else torch.device("cpu")
        acp = _alphas_cumprod(self.shape.timesteps)
        times = torch.linspace(self.shape.timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        x = torch.randn(B, D, generator=generator, device=g).to(dev)
        for i, t in enumerate(times):
            x0 = self._guided_x0(text, cond, x, torch.full((B,), t, device=dev), guidance_scale)
            if renorm_x0:
                x0 = F.normalize(x0, dim=-1) * math.sqrt(D)
            if i + 1 < len(times):  # the last step returns its x0 prediction itself
                a_t, a_prev = float(acp[t]), float(acp[times[i + 1]])
                # Both samplers draw the same noise sequence, so DDPM equals DDIM at eta=1 step for step.
                stochastic = sampler == "ddpm" or eta > 0
                noise = torch.randn(B, D, generator=generator, device=g).to(dev) if stochastic else 0.0
                x = (_ddpm_step if sampler == "ddpm" else _ddim_step)(x, x0, noise, a_t, a_prev, eta)
        return x0

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


def _ddpm_step(x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | float, a_t: float, a_prev: float,
               eta: float) -> torch.Tensor:
    """Ancestral step: a sample of q(x_prev | x_t, x0), the posterior of the respaced chain (β = 1 − ᾱ_t/ᾱ_prev)."""
    beta = 1 - a_t / a_prev
    mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
    return mean + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * noise


def _ddim_step(x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | float, a_t: float, a_prev: float,
               eta: float) -> torch.Tensor:
    """DDIM (Song et al. 2021): re-noise x0 toward ᾱ_prev along the implied ε; eta = 0 is deterministic."""
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps + sigma * noise


class EMA:
    """Exponential moving average of a module's parameters, kept as BUFFERS of a small nn.Module (``EMA.module``)
    so a training engine checkpoints it with the model state (DeepSpeed saves buffers; it must not see them as
    parameters). The average is float32 whatever the parameters' dtype: a 0.999 lerp in half precision would lose
    most updates to rounding. Buffer names are parameter names with '.' → '__'."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, _ in model.named_parameters()]
        self.module = nn.Module()
        for name, p in model.named_parameters():
            key = name.replace(".", "__")
            if hasattr(self.module, key) or key == "num_updates":
                raise ValueError(f"EMA: parameter name {name!r} collides with another buffer name")
            self.module.register_buffer(key, p.detach().float().clone())
        self.module.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(model.named_parameters())
        if list(params) != self.names:
            raise ValueError("EMA: the model's parameters differ from the ones the EMA was built from")
        return [p.detach() for p in params.values()], [getattr(self.module, n.replace(".", "__")) for n in self.names]

    def current_decay(self) -> float:
        n = int(self.module.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema ← d · ema + (1 − d) · param, d = ``current_decay()`` (warm-up counts the updates before this one)."""
        params, bufs = self._pairs(model)
        if params and bufs[0].device != params[0].device:
            self.module.to(params[0].device)  # the model moved (e.g. to the GPU) after the EMA was built
            params, bufs = self._pairs(model)
        d = self.current_decay()
        torch._foreach_lerp_(bufs, [p.to(b.dtype) for p, b in zip(params, bufs)], 1.0 - d)
        self.module.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, b in zip(*self._pairs(model)):
            p.copy_(b)

    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with EMA weights in place of the parameters (each in its parameter's dtype and
        device), for ``model.load_state_dict(..., strict=True)``. If ``EMA.module`` is attached to ``model`` (so the
        engine saves it), its own buffers are left out: a fresh model has no such keys."""
        own = {id(b) for b in self.module.buffers()}
        params = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            if id(value) in own:
                continue
            if key in params:
                out[key] = getattr(self.module, key.replace(".", "__")).to(value.device, value.dtype).clone()
            else:
                out[key] = value.detach().clone()
        return out
