"""DALL-E 2's decoder: a diffusion U-Net over RGB pixels conditioned on a CLIP image embedding (a modified GLIDE).

The image embedding enters twice, as the paper describes: projected and added to the timestep embedding every
residual block is modulated by, and projected into ``context_tokens`` extra tokens of context that every attention
layer of the U-Net attends to (their keys and values are concatenated to the spatial ones, as GLIDE does with its
text tokens). With ``text_vocab`` > 0 the caption is encoded by a small transformer whose output tokens join that
context (and whose mean is added to the timestep embedding too); with 0 the decoder is conditioned on the image
embedding alone.

Training (``loss_parts``): cosine schedule, ε or v prediction, MSE; classifier-free guidance by dropping the image
embedding (to a learned null embedding) and the caption (to the empty caption) at the rates given (paper: 10 % and
50 %). Sampling (``sample``): the respaced DDPM / DDIM chain of ``pipeline.training.diffusion``, guidance
uncond + s · (cond − uncond) with both conditions dropped for uncond, x0 clipped to the pixel range [-1, 1].
Single device, torch only: the engine wraps it from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.prior.transformer import empty_captions
from pipeline.training.diffusion import alphas_cumprod, reverse_diffusion, scaled, timestep_features

PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class DecoderShape:
    image_size: int  # base resolution the U-Net denoises (64 at real size)
    embed_dim: int  # CLIP embedding width it is conditioned on
    channels: int = 64  # width of the first level; level i has channels × channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2)  # levels (0 = full resolution) with attention; the middle always has
    head_channels: int = 32
    context_tokens: int = 4  # extra tokens projected from the image embedding (DALL-E 2: 4)
    context_dim: int = 128  # width of the context tokens and of the caption encoder
    text_vocab: int = 0  # 0: no caption conditioning
    text_len: int = 0
    text_layers: int = 0
    dropout: float = 0.0
    timesteps: int = 1000
    prediction: str = "eps"

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attention_levels"):  # JSON round trips give lists
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        positive = ("image_size", "embed_dim", "channels", "num_res_blocks", "head_channels", "context_tokens",
                    "context_dim", "timesteps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"DecoderShape.{name}: must be > 0, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"DecoderShape.channel_mult: positive multipliers needed, got {self.channel_mult}")
        if any(not 0 <= lv < len(self.channel_mult) for lv in self.attention_levels):
            raise ValueError(f"DecoderShape.attention_levels: {self.attention_levels} outside levels "
                             f"0..{len(self.channel_mult) - 1}")
        down = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % down:
            raise ValueError(f"DecoderShape.image_size: {self.image_size} is not divisible by {down}, the U-Net's "
                             f"downsampling over {len(self.channel_mult)} levels")
        if self.text_vocab and (self.text_len < 1 or self.text_layers < 1):
            raise ValueError("DecoderShape.text_len/text_layers: caption conditioning (text_vocab > 0) needs both > 0")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"DecoderShape.prediction: must be eps or v, got {self.prediction!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DecoderShape.dropout: must be in [0, 1), got {self.dropout}")

    @property
    def conditioned_on_text(self) -> bool:
        return self.text_vocab > 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderShape:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def _groups(ch: int) -> int:
    return math.gcd(32, ch)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, scale-and-shift by the (time + image embedding) vector, GroupNorm → SiLU → conv."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, 2 * cout)
        self.norm2, self.drop = nn.GroupNorm(_groups(cout), cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: a deep U-Net trains from step one
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class AttnBlock(nn.Module):
    """Self-attention over the feature map's positions plus the context tokens (their keys and values first)."""

    def __init__(self, ch: int, head_channels: int, context_dim: int):
        super().__init__()
        self.n_head = max(1, ch // head_channels)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.ctx_kv = nn.Linear(context_dim, 2 * ch)
        self.proj = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).split(C, dim=2)
        ck, cv = self.ctx_kv(ctx).split(C, dim=2)  # (B, K, C)
        k, v = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        q, k, v = (t.view(B, -1, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(y).transpose(1, 2).view(B, C, H, W)


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CaptionEncoder(nn.Module):
    """A small bidirectional transformer over the caption's padded tokens (per-position pads, as the priors')."""

    def __init__(self, s: DecoderShape):
        super().__init__()
        D = s.context_dim
        self.tok = nn.Embedding(s.text_vocab + s.text_len, D)
        self.pos = nn.Parameter(torch.randn(s.text_len, D) * 0.02)
        layer = nn.TransformerEncoderLayer(D, max(1, D // 64), 4 * D, s.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, s.text_layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(D)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.ln(self.blocks(self.tok(text) + self.pos))  # (B, T, D)


class Decoder(nn.Module):
    def __init__(self, shape: DecoderShape, activation_checkpointing: bool = False):
        super().__init__()
        s, ch = shape, shape.channels
        self.shape, self.activation_checkpointing = shape, activation_checkpointing
        temb = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.image_to_time = nn.Linear(s.embed_dim, temb)
        self.image_to_tokens = nn.Linear(s.embed_dim, s.context_tokens * s.context_dim)
        self.null_image_emb = nn.Parameter(torch.randn(s.embed_dim))  # scaled space, like the embeddings it replaces
        self.caption = CaptionEncoder(s) if s.conditioned_on_text else None
        self.text_to_time = nn.Linear(s.context_dim, temb) if s.conditioned_on_text else None
        self.ctx_norm = nn.LayerNorm(s.context_dim)
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.down, self.up, skips = nn.ModuleList(), nn.ModuleList(), [ch]
        cur = ch
        for level, mult in enumerate(s.channel_mult):
            for _ in range(s.num_res_blocks):
                self.down.append(self._stage(cur, ch * mult, level, temb))
                cur = ch * mult
                skips.append(cur)
            if level + 1 < len(s.channel_mult):
                self.down.append(nn.ModuleList([Down(cur)]))
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, temb, s.dropout), AttnBlock(cur, s.head_channels, s.context_dim),
                                  ResBlock(cur, cur, temb, s.dropout)])
        for level, mult in reversed(list(enumerate(s.channel_mult))):
            for i in range(s.num_res_blocks + 1):
                blocks = self._stage(cur + skips.pop(), ch * mult, level, temb)
                cur = ch * mult
                if level and i == s.num_res_blocks:
                    blocks.append(Up(cur))
                self.up.append(blocks)
        self.out = nn.Sequential(nn.GroupNorm(_groups(cur), cur), nn.SiLU(), nn.Conv2d(cur, 3, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _stage(self, cin: int, cout: int, level: int, temb: int) -> nn.ModuleList:
        blocks: list[nn.Module] = [ResBlock(cin, cout, temb, self.shape.dropout)]
        if level in self.shape.attention_levels:
            blocks.append(AttnBlock(cout, self.shape.head_channels, self.shape.context_dim))
        return nn.ModuleList(blocks)

    def _run(self, block: nn.Module, x: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training:
            return checkpoint(block, x, emb, ctx, use_reentrant=False)
        return block(x, emb, ctx)

    def conditioning(self, t: torch.Tensor, image_emb: torch.Tensor, text: torch.Tensor | None,
                     drop_image: torch.Tensor | None, drop_text: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(the vector every residual block is modulated by (B, 4·channels), the context tokens (B, K [+ T], Dc))."""
        s, B, dt = self.shape, image_emb.shape[0], self.inp.weight.dtype
        img = scaled(image_emb).to(dt)  # float32 in; a bf16/fp16 engine holds half weights
        if drop_image is not None:
            img = torch.where(drop_image.to(img.device, torch.bool)[:, None], self.null_image_emb.to(dt), img)
        emb = self.time_mlp(timestep_features(t, s.channels).to(dt)) + self.image_to_time(img)
        ctx = self.image_to_tokens(img).view(B, s.context_tokens, s.context_dim)
        if self.caption is not None:
            if text is None:
                raise ValueError("this decoder is conditioned on captions: give text (B, text_len) token ids")
            if drop_text is not None:
                blank = empty_captions(1, s.text_len, s.text_vocab, text.device)
                text = torch.where(drop_text.to(text.device, torch.bool)[:, None], blank, text)
            words = self.caption(text)
            emb = emb + self.text_to_time(words.mean(1))
            ctx = torch.cat([ctx, words], dim=1)
        return emb, self.ctx_norm(ctx)

    def forward(self, x: torch.Tensor, t: torch.Tensor, image_emb: torch.Tensor, text: torch.Tensor | None = None,
                drop_image: torch.Tensor | None = None, drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 3, S, S) noised pixels, t (B,) timesteps, image_emb (B, D) raw CLIP embeddings, text (B, T) padded
        caption ids (caption-conditioned decoders) → ε or v prediction (B, 3, S, S)."""
        emb, ctx = self.conditioning(t, image_emb, text, drop_image, drop_text)
        h = self.inp(x.to(emb.dtype))
        skips = [h]
        for blocks in self.down:
            for block in blocks:
                h = self._run(block, h, emb, ctx)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, emb, ctx)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = self._run(block, h, emb, ctx)
        return self.out(h)

    def _draw(self, B: int, image_drop: float, caption_drop: float, generator: torch.Generator | None,
              device: torch.device) -> tuple[torch.Tensor, ...]:
        """t, noise, image-drop and caption-drop masks from ``generator`` in a fixed order, moved to ``device``."""
        s, g = self.shape, generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, s.timesteps, (B,), generator=generator, device=g)
        noise = torch.randn(B, 3, s.image_size, s.image_size, generator=generator, device=g)
        d_img = torch.rand(B, generator=generator, device=g) < image_drop
        d_txt = torch.rand(B, generator=generator, device=g) < caption_drop
        return tuple(v.to(device) for v in (t, noise, d_img, d_txt))

    def loss_parts(self, pixels: torch.Tensor, image_emb: torch.Tensor, text: torch.Tensor | None = None,
                   valid: torch.Tensor | None = None, image_drop: float = 0.0, caption_drop: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE of the ε (or v) prediction over valid rows; ``pixels`` (B, 3, S, S) in [-1, 1]."""
        for name, p in (("image_drop", image_drop), ("caption_drop", caption_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name}: a probability in [0, 1), got {p}")
        s, B, dev = self.shape, pixels.shape[0], pixels.device
        if tuple(pixels.shape[1:]) != (3, s.image_size, s.image_size):
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}; this decoder denoises (B, 3, {s.image_size}, "
                             f"{s.image_size})")
        valid = torch.ones(B, dtype=torch.bool, device=dev) if valid is None else valid.to(dev, torch.bool)
        v4 = valid[:, None, None, None]
        # Invalid rows (no image, unusable embedding, held out) are blanked before the forward: 0 · NaN in the
        # backward would otherwise still reach the weight gradients.
        x0 = torch.where(v4, pixels.float(), 0.0)
        emb = torch.where(valid[:, None], image_emb.float(), 1.0)
        if text is not None:
            text = torch.where(valid[:, None], text, empty_captions(1, s.text_len, s.text_vocab, dev))
        t, noise, d_img, d_txt = self._draw(B, image_drop, caption_drop, generator, dev)
        a = alphas_cumprod(s.timesteps).float().to(dev)[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if s.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = self(x_t, t, emb, text, d_img, d_txt).float()
        per_row = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        n = valid.sum()
        loss = torch.where(valid, per_row, 0.0).sum() / n.clamp(min=1)  # no branch: an all-invalid batch gives 0
        return loss, {"mse": float(loss.detach()), "valid": float(n)}

    def predict_x0(self, x: torch.Tensor, t: int, out: torch.Tensor) -> torch.Tensor:
        """The model output at timestep ``t`` as an x0 prediction."""
        a = float(alphas_cumprod(self.shape.timesteps)[t])
        if self.shape.prediction == "v":
            return math.sqrt(a) * x - math.sqrt(1 - a) * out
        return (x - math.sqrt(1 - a) * out) / math.sqrt(a)

    def _guided_x0(self, x: torch.Tensor, t: int, image_emb: torch.Tensor, text: torch.Tensor | None,
                   guidance_scale: float) -> torch.Tensor:
        B, dev = x.shape[0], x.device
        tt = torch.full((B,), t, device=dev)
        if guidance_scale == 1.0:
            x0 = self.predict_x0(x, t, self(x, tt, image_emb, text).float())
        else:  # both halves in one 2B batch; uncond drops image embedding and caption alike
            drop = torch.arange(2 * B, device=dev) >= B
            out = self(x.repeat(2, 1, 1, 1), tt.repeat(2), image_emb.repeat(2, 1),
                       None if text is None else text.repeat(2, 1), drop, drop).float()
            cond, uncond = self.predict_x0(x, t, out[:B]), self.predict_x0(x, t, out[B:])
            x0 = uncond + guidance_scale * (cond - uncond)
        return x0.clamp(-1.0, 1.0)  # x0 lives in the pixel range: clipping keeps guided/early steps on it

    @torch.no_grad()
    def sample(self, image_emb: torch.Tensor, text: torch.Tensor | None = None, steps: int = 50,
               sampler: str = "ddim", guidance_scale: float = 1.0, eta: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] decoded from raw CLIP image embeddings (B, D) (and padded captions).
        Runs in eval mode, restoring the training flag after."""
        s = self.shape
        if image_emb.ndim != 2 or image_emb.shape[1] != s.embed_dim:
            raise ValueError(f"image embeddings of shape {tuple(image_emb.shape)}; this decoder was built for "
                             f"{s.embed_dim}-d CLIP embeddings")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        B, was_training = image_emb.shape[0], self.training
        self.eval()
        try:
            return reverse_diffusion((B, 3, s.image_size, s.image_size),
                                     lambda x, t: self._guided_x0(x, t, image_emb, text, guidance_scale),
                                     s.timesteps, steps, sampler, eta, generator, image_emb.device)
        finally:
            self.train(was_training)


def count_params(shape: DecoderShape) -> int:
    """Parameters of a decoder of ``shape``, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Decoder(shape).parameters())


def forward_flops(shape: DecoderShape) -> float:
    """FLOPs of one forward pass for one image, counted by torch's FlopCounterMode on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = Decoder(shape)
        x = torch.zeros(1, 3, shape.image_size, shape.image_size)
        emb = torch.zeros(1, shape.embed_dim)
        text = torch.zeros(1, shape.text_len, dtype=torch.long) if shape.conditioned_on_text else None
        with FlopCounterMode(display=False) as counter:
            model(x, torch.zeros(1, dtype=torch.long), emb, text)
    return float(counter.get_total_flops())


def pixels_to_uint8(x: torch.Tensor) -> Any:
    """(B, 3, S, S) in [-1, 1] → (B, S, S, 3) uint8 numpy."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
