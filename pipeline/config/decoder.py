"""DALL-E 2's decoder's typed configuration (``decoder:`` section): U-Net shape, diffusion, guidance dropout, and the
engine keys every trained model shares (``pipeline.config.engine``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.config.checks import check as _check
from pipeline.config.engine import EngineConfig

DECODER_SIZES: dict[str, dict[str, object]] = {
    # U-Net width, per-level multipliers, residual blocks per level, attention levels, context / caption encoder.
    # At 64×64 with ViT-L/14's 768-d embeddings and 77 caption tokens of CLIP's BPE they count 1.9 M, 40 M, 0.26 B,
    # 1.13 B and 3.0 B parameters on the meta device (tests/decoder/test_decoder_model.py); 3b is GLIDE-like.
    "tiny": {"channels": 16, "channel_mult": "1,2", "num_res_blocks": 1, "attention_levels": "1",
             "head_channels": 16, "context_dim": 32, "text_layers": 1},
    "small": {"channels": 64, "channel_mult": "1,2,3,4", "num_res_blocks": 2, "attention_levels": "2,3",
              "head_channels": 64, "context_dim": 256, "text_layers": 2},
    "base": {"channels": 192, "channel_mult": "1,2,3,4", "num_res_blocks": 2, "attention_levels": "2,3",
             "head_channels": 64, "context_dim": 512, "text_layers": 4},
    "1b": {"channels": 352, "channel_mult": "1,2,3,4", "num_res_blocks": 3, "attention_levels": "1,2,3",
           "head_channels": 64, "context_dim": 1024, "text_layers": 8},
    "3b": {"channels": 512, "channel_mult": "1,2,3,4", "num_res_blocks": 3, "attention_levels": "1,2,3",
           "head_channels": 64, "context_dim": 2048, "text_layers": 16},
}


def int_list(text: str, key: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        out = ()
    _check(bool(out) or text == "", key, f"expected comma-separated integers, got {text!r}")
    return out


@dataclass
class DecoderConfig(EngineConfig):
    """DALL-E 2's decoder: a diffusion U-Net from the CLIP image embedding to pixels, on the priors' engine."""

    SECTION: ClassVar[str] = "decoder"

    size: str = ""
    """A named size (tiny, small, base, 1b, 3b) setting the U-Net keys below; empty: use those keys."""
    image_size: int = 0
    """Resolution the decoder generates (DALL-E 2's base decoder: 64); 0: download.image_size. Image shards of
    another resolution are refused."""
    channels: int = 64
    """U-Net base width (times channel_mult per level)."""
    channel_mult: str = "1,2,2"
    """Per-level width multipliers; the U-Net halves the resolution between levels."""
    num_res_blocks: int = 2
    """Residual blocks per U-Net level."""
    attention_levels: str = "1,2"
    """Levels (0 = full resolution) whose blocks attend over positions and the context tokens; the middle always."""
    head_channels: int = 32
    """Channels per attention head."""
    context_tokens: int = 4
    """Extra context tokens projected from the CLIP image embedding (DALL-E 2: 4)."""
    context_dim: int = 128
    """Width of the context tokens and of the caption transformer."""
    caption: bool = True
    """Condition on the caption too (a small transformer over its BPE ids), as DALL-E 2's decoder does."""
    text_len: int = 16
    """Caption tokens the decoder's caption transformer reads."""
    text_layers: int = 1
    """Layers of the caption transformer."""
    dropout: float = 0.0
    """Dropout in the residual blocks while training."""
    timesteps: int = 1000
    """Diffusion steps of the cosine noise schedule."""
    prediction: str = "v"
    """v: predict v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0 (Salimans & Ho); eps: predict the noise (DDPM, DALL-E 2's). v is the
    default: x0 = sqrt(ᾱ)·x − sqrt(1−ᾱ)·v stays bounded at high noise, where ε's x0 = (x − sqrt(1−ᾱ)·ε)/sqrt(ᾱ)
    divides by sqrt(ᾱ_T) ≈ 0.006, so a briefly trained ε decoder samples saturated colours (a 150-step test)."""
    image_drop: float = 0.1
    """Probability the image embedding is replaced by a learned null embedding in training (DALL-E 2: 10 %)."""
    caption_drop: float = 0.5
    """Probability the caption is dropped in training (DALL-E 2: 50 %)."""
    ema_decay: float = 0.999
    """EMA of the weights, saved with checkpoints; model.safetensors samples with it. 0 turns it off."""
    heldout_percent: float = 5.0
    """Rows (by key hash) never trained on: keep it equal to the diffusion prior's, so both skip the same rows."""
    eval_rows: int = 64
    """Held-out rows eval-decoder decodes (the first by key)."""
    micro_batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 20
    output: str = ""
    """Checkpoint folder; empty means <run_dir>/decoder."""

    def __post_init__(self) -> None:
        if self.size:
            _check(self.size in DECODER_SIZES, "decoder.size", f"must be one of {', '.join(DECODER_SIZES)}")
            for k, v in DECODER_SIZES[self.size].items():
                setattr(self, k, v)
        for name in ("channels", "num_res_blocks", "head_channels", "context_tokens", "context_dim", "text_len",
                     "text_layers", "eval_rows"):
            _check(getattr(self, name) > 0, f"decoder.{name}", "must be > 0")
        _check(self.image_size >= 0, "decoder.image_size", "must be >= 0 (0: download.image_size)")
        mult = int_list(self.channel_mult, "decoder.channel_mult")
        _check(bool(mult) and min(mult) > 0, "decoder.channel_mult", "must be positive integers, e.g. 1,2,2")
        levels = int_list(self.attention_levels, "decoder.attention_levels")
        _check(all(0 <= lv < len(mult) for lv in levels), "decoder.attention_levels",
               f"levels must be in 0..{len(mult) - 1} (decoder.channel_mult has {len(mult)})")
        _check(self.prediction in ("eps", "v"), "decoder.prediction", "must be eps or v")
        _check(self.timesteps > 1, "decoder.timesteps", "must be > 1")
        for name in ("image_drop", "caption_drop", "dropout", "ema_decay"):
            _check(0.0 <= getattr(self, name) < 1.0, f"decoder.{name}", "must be in [0, 1)")
        _check(0.0 <= self.heldout_percent < 100.0, "decoder.heldout_percent", "must be in [0, 100)")
        self._check_engine()

    def levels(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(channel multipliers, attention levels) as integers."""
        return (int_list(self.channel_mult, "decoder.channel_mult"),
                int_list(self.attention_levels, "decoder.attention_levels"))
