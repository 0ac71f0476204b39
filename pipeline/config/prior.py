"""The prior's typed configuration (``prior:`` section): model shape, DeepSpeed engine, data loader, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.checks import check as _check
from pipeline.config.engine import EngineConfig

PRIOR_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (n_layer, n_head, n_embd). 12b is the DALL-E paper's (64 layers, d_model 3968, 62 heads of 64); the
    # others keep 64-wide heads. With DALL-E's vocabularies (16384 text, 8192 image, 256 + 1024 positions) they
    # count 0.34 B, 1.28 B, 4.18 B and 12.23 B parameters (tests/prior/test_prior_sizes.py).
    "tiny": (4, 4, 128), "350m": (24, 16, 1024), "1.3b": (24, 32, 2048), "4b": (36, 48, 3072), "12b": (64, 62, 3968),
}
ATTENTION_KINDS = ("dense", "row", "column", "conv")


@dataclass
class PriorConfig(EngineConfig):
    """The DALL-E 1 autoregressive transformer over text + image tokens, trained with DeepSpeed."""

    kind: str = "ar"
    """ar: DALL-E 1's autoregressive transformer over text + image tokens; diffusion: DALL-E 2's diffusion prior from
    the CLIP text embedding (and caption tokens) to the CLIP image embedding. Same engine, loader and checkpoints."""
    size: str = ""
    """A named size (tiny, 350m, 1.3b, 4b, 12b) that sets n_layer, n_head and n_embd; empty: use those keys."""
    n_layer: int = 4
    """Transformer layers (set by size when size is given)."""
    n_head: int = 4
    """Attention heads per layer; n_embd must be divisible by it."""
    n_embd: int = 128
    """Model width d_model."""
    text_len: int = 16
    """Caption tokens the model reads (longer captions are truncated, shorter padded; DALL-E: 256)."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs while training."""
    attention: str = "dense"
    """Per-layer attention masks, cycled over the layers: comma-separated dense/row/column/conv. 'dalle' is the
    paper's pattern: row,column,row,row repeated, the last layer conv."""
    conv_kernel: int = 11
    """Side of the causal convolutional attention window over the image grid (DALL-E: 11)."""
    text_loss_weight: float = 0.0
    """Share of the loss on caption tokens (DALL-E: 0.125, i.e. 1/8 text and 7/8 image); 0 trains image tokens only."""
    caption_dropout: float = 0.0
    """Probability a training caption is replaced by the empty (all-pad) caption, for classifier-free guidance."""
    timesteps: int = 1000
    """Diffusion steps of the cosine noise schedule (kind: diffusion)."""
    ema_decay: float = 0.999
    """EMA of the diffusion prior's weights, saved with checkpoints and exported for sampling; 0 turns it off."""
    heldout_percent: float = 5.0
    """Diffusion: rows (chosen by key hash) never trained on, for the held-out evaluation."""
    eval_rows: int = 256
    """Diffusion: held-out rows `eval-prior` scores (the first by key)."""
    output: str = ""
    """Checkpoint folder; empty means <run_dir>/prior."""

    def __post_init__(self) -> None:
        if self.size:
            _check(self.size in PRIOR_SIZES, "prior.size", f"must be one of {', '.join(PRIOR_SIZES)}")
            self.n_layer, self.n_head, self.n_embd = PRIOR_SIZES[self.size]
        for name in ("n_layer", "n_head", "n_embd", "text_len", "conv_kernel"):
            _check(getattr(self, name) > 0, f"prior.{name}", "must be > 0")
        _check(self.n_embd % self.n_head == 0, "prior.n_embd", "must be divisible by prior.n_head")
        _check(0.0 <= self.dropout < 1.0, "prior.dropout", "must be in [0, 1)")
        _check(0.0 <= self.caption_dropout < 1.0, "prior.caption_dropout", "must be in [0, 1)")
        _check(0.0 <= self.text_loss_weight < 1.0, "prior.text_loss_weight", "must be in [0, 1)")
        _check(self.kind in ("ar", "diffusion"), "prior.kind", "must be ar or diffusion")
        _check(self.timesteps > 1, "prior.timesteps", "must be > 1")
        _check(0.0 <= self.ema_decay < 1.0, "prior.ema_decay", "must be in [0, 1)")
        _check(0.0 <= self.heldout_percent < 100.0, "prior.heldout_percent", "must be in [0, 100)")
        _check(self.eval_rows > 0, "prior.eval_rows", "must be > 0")
        self._check_engine()
        self.layer_attention()  # validates prior.attention

    def layer_attention(self) -> list[str]:
        """The attention kind of each layer."""
        if self.attention == "dalle":
            kinds = [("row", "column", "row", "row")[i % 4] for i in range(self.n_layer)]
            kinds[-1] = "conv"
            return kinds
        cycle = [k.strip() for k in self.attention.split(",")]
        for k in cycle:
            _check(k in ATTENTION_KINDS, "prior.attention",
                   f"unknown kind {k!r}; use 'dalle' or a comma list of {', '.join(ATTENTION_KINDS)}")
        return [cycle[i % len(cycle)] for i in range(self.n_layer)]
