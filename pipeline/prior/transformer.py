"""DALL-E 1's autoregressive prior: one decoder-only transformer over [text tokens | image tokens].

Single-device model code (parallelism is applied from outside, by ``pipeline.runtime.ds_seam``). Text positions use
DALL-E's per-position padding tokens (the pad at position i is its own token ``text_vocab + i``), image positions get
row and column embeddings. The image loss predicts image token j from position ``text_len - 1 + j``; an optional text
loss reuses the text embedding matrix as its output layer and takes a fraction ``w`` of the total (DALL-E: w = 1/8).
Layers may use DALL-E's sparse row / column / convolutional attention patterns (see ``attention_mask``); sampling
supports classifier-free guidance against the empty caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config.prior import ATTENTION_KINDS  # one list of kinds, validated by the config too

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PriorShape:
    text_vocab: int
    text_len: int
    image_vocab: int
    image_grid: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    attention: tuple[str, ...] = ()
    """One kind per layer (dense/row/column/conv); empty: every layer dense (and checkpoints from before this key)."""
    conv_kernel: int = 11

    def __post_init__(self) -> None:
        # model.json stores asdict(shape); a JSON round trip would hand back a list, so accept any sequence.
        object.__setattr__(self, "attention", tuple(self.attention))
        if len(self.attention) not in (0, self.n_layer):
            raise ValueError(f"PriorShape.attention: has {len(self.attention)} kinds, needs 0 or n_layer "
                             f"({self.n_layer})")
        unknown = sorted(set(self.attention) - set(ATTENTION_KINDS))
        if unknown:
            raise ValueError(f"PriorShape.attention: unknown kinds {unknown}; use {', '.join(ATTENTION_KINDS)}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"PriorShape.conv_kernel: must be odd and >= 1, got {self.conv_kernel}")

    @property
    def image_len(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len - 1

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return self.attention or ("dense",) * self.n_layer


def attention_mask(kind: str, text_len: int, image_grid: int, conv_kernel: int = 11,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool mask, True = query (row) may attend to key (column), over L = text_len + image_grid² - 1 inputs.

    Why masks rather than block-sparse kernels: flash kernels do not take DALL-E's sparse patterns, and one masked
    SDPA call keeps a single code path for training, cached sampling and tests. The mask reproduces the pattern
    (what each position may see), not the compute saving: masked scores are still computed, then dropped.

    Text queries are causal over text. The image query holding token i (grid row r, column c) sees every text
    position and the image tokens j <= i allowed by ``kind``: row = rows r-1 and r; column = column c;
    conv = within conv_kernel // 2 in both row and column; dense = all. Every query sees itself.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {kind!r}")
    pos = torch.arange(text_len + image_grid * image_grid - 1, device=device)
    causal = pos[None, :] <= pos[:, None]
    if kind == "dense":
        return causal
    i = (pos - text_len).clamp(min=0)
    r, c = i // image_grid, i % image_grid
    dr, dc = r[None, :] - r[:, None], c[None, :] - c[:, None]  # key minus query
    if kind == "row":
        ok = (dr == 0) | (dr == -1)
    elif kind == "column":
        ok = dc == 0
    else:
        ok = (dr.abs() <= conv_kernel // 2) & (dc.abs() <= conv_kernel // 2)
    is_image = pos >= text_len
    # Only image-query x image-key pairs are restricted; text keys stay visible to all later queries.
    return causal & (ok | ~is_image[None, :] | ~is_image[:, None])


class SelfAttention(nn.Module):
    def __init__(self, s: PriorShape):
        super().__init__()
        self.n_head = s.n_head
        self.qkv = nn.Linear(s.n_embd, 3 * s.n_embd)
        self.proj = nn.Linear(s.n_embd, s.n_embd)
        self.dropout = s.dropout

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``mask``: (T, keys) bool rows of ``attention_mask`` for these queries; None = dense causal."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:
            if T != 1:
                raise ValueError("cached attention takes one new position at a time")
            # A dense query attends to every cached position before it; a sparse one gets its mask row.
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        # Dense layers keep is_causal without a mask: that is the flash-attention path on GPU.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past is None and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class Block(nn.Module):
    def __init__(self, s: PriorShape):
        super().__init__()
        self.ln1 = nn.LayerNorm(s.n_embd)
        self.attn = SelfAttention(s)
        self.ln2 = nn.LayerNorm(s.n_embd)
        self.mlp = nn.Sequential(nn.Linear(s.n_embd, 4 * s.n_embd), nn.GELU(), nn.Linear(4 * s.n_embd, s.n_embd),
                                 nn.Dropout(s.dropout))

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.attn(self.ln1(x), past, mask)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class DalleTransformer(nn.Module):
    def __init__(self, s: PriorShape, activation_checkpointing: bool = False):
        super().__init__()
        self.shape = s
        self.activation_checkpointing = activation_checkpointing
        self.text_emb = nn.Embedding(s.text_vocab + s.text_len, s.n_embd)
        self.text_pos = nn.Embedding(s.text_len, s.n_embd)
        self.image_emb = nn.Embedding(s.image_vocab, s.n_embd)
        self.row_emb = nn.Embedding(s.image_grid, s.n_embd)
        self.col_emb = nn.Embedding(s.image_grid, s.n_embd)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.n_embd)
        self.image_head = nn.Linear(s.n_embd, s.image_vocab, bias=False)
        # Masks are built lazily, once per (kind, device), outside the state_dict: checkpoints keep their keys and
        # a model built on the meta device (size checks) allocates none.
        self._masks: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _embed_text(self, text: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(text.shape[1], device=text.device)
        return self.text_emb(text) + self.text_pos(pos)

    def _embed_image(self, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + image.shape[1], device=image.device)
        g = self.shape.image_grid
        return self.image_emb(image) + self.row_emb(pos // g) + self.col_emb(pos % g)

    def _mask(self, kind: str, device: torch.device, start: int, length: int) -> torch.Tensor | None:
        """Rows start..start+length of ``kind``'s mask, cut to the keys present (None for dense)."""
        if kind == "dense":
            return None
        key = (kind, device)
        if key not in self._masks:
            s = self.shape
            self._masks[key] = attention_mask(kind, s.text_len, s.image_grid, s.conv_kernel, device)
        return self._masks[key][start: start + length, : start + length]

    def _run(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        start = cache[0][0].shape[2] if cache else 0  # absolute position of x[:, 0]: the cache length
        masks = {k: self._mask(k, x.device, start, x.shape[1]) for k in set(self.shape.layer_kinds)}
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            past = cache[i] if cache is not None else None
            mask = masks[self.shape.layer_kinds[i]]
            if self.activation_checkpointing and self.training and past is None:
                x, kv = checkpoint(block, x, None, mask, use_reentrant=False)
            else:
                x, kv = block(x, past, mask)
            new_cache.append(kv)
        return self.ln_f(x), new_cache

    def forward(self, text: torch.Tensor, image: torch.Tensor,
                with_text: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """text (B, T) padded ids, image (B, N) codes → (image logits (B, N, Vi), text logits (B, T-1, Vt)).

        ``with_text=False`` skips the text logits: over a 49k BPE vocabulary they cost more than the whole image
        head, and the image-only loss does not need them.
        """
        x = torch.cat([self._embed_text(text), self._embed_image(image[:, :-1])], dim=1)  # (B, T+N-1, C)
        h, _ = self._run(x)
        T = self.shape.text_len
        image_logits = self.image_head(h[:, T - 1:])
        text_logits = h[:, : T - 1] @ self.text_emb.weight.T if with_text else None
        return image_logits, text_logits

    def loss_parts(self, text: torch.Tensor, image: torch.Tensor,
                   text_loss_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(total, image loss, text loss or None): total = (1 - w) · image + w · text, w the text fraction."""
        w = text_loss_weight
        if not 0.0 <= w < 1.0:
            raise ValueError(f"text_loss_weight: a fraction in [0, 1), got {w}")
        image_logits, text_logits = self(text, image, with_text=w > 0)
        image_loss = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]), image.reshape(-1))
        if text_logits is None:
            return image_loss, image_loss, None
        text_loss = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), text[:, 1:].reshape(-1))
        return (1 - w) * image_loss + w * text_loss, image_loss, text_loss

    def loss(self, text: torch.Tensor, image: torch.Tensor, text_loss_weight: float = 0.0) -> torch.Tensor:
        return self.loss_parts(text, image, text_loss_weight)[0]

    def _with_uncond(self, text: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Append empty-caption rows (B → 2B) when guiding; scale 1 keeps the plain batch."""
        if guidance_scale == 1.0:
            return text
        return torch.cat([text, empty_captions(len(text), self.shape.text_len, self.shape.text_vocab, text.device)])

    @torch.no_grad()
    def generate(self, text: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None, guidance_scale: float = 1.0,
                 top_p: float = 1.0) -> torch.Tensor:
        """Sample image codes (B, N) for padded text (B, T), one position at a time with a KV cache.

        ``guidance_scale`` s != 1: classifier-free guidance, sampling from uncond + s · (cond − uncond), with the
        unconditional (empty caption) rows run in the same batch. ``top_k`` / ``top_p`` (nucleus) filter the guided
        logits after the temperature (see ``_sample``).
        """
        B, N = text.shape[0], self.shape.image_len
        h, cache = self._run(self._embed_text(self._with_uncond(text, guidance_scale)))
        logits = self.image_head(h[:, -1])
        out = torch.empty(B, N, dtype=torch.long, device=text.device)
        for j in range(N):
            out[:, j] = _sample(_guide(logits, B, guidance_scale), temperature, top_k, generator, top_p)
            if j == N - 1:
                break
            step = out[:, j: j + 1].repeat(len(logits) // B, 1)  # both halves take the sampled token
            h, cache = self._run(self._embed_image(step, start=j), cache)
            logits = self.image_head(h[:, -1])
        return out

    @torch.no_grad()
    def generate_uncached(self, text: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                          generator: torch.Generator | None = None, guidance_scale: float = 1.0,
                          top_p: float = 1.0) -> torch.Tensor:
        """Reference sampler that recomputes the whole prefix each step (for tests and benchmarks)."""
        B, N = text.shape[0], self.shape.image_len
        full = self._with_uncond(text, guidance_scale)
        out = torch.zeros(len(full), N, dtype=torch.long, device=text.device)
        for j in range(N):
            image_logits, _ = self(full, out[:, : j + 1], with_text=False)  # out[:, j]: placeholder, dropped
            out[:, j] = _sample(_guide(image_logits[:, j], B, guidance_scale), temperature, top_k,
                                generator, top_p).repeat(len(full) // B)
        return out[:B]


def _guide(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """Classifier-free guidance over [cond (B) ; uncond (B)] rows, in float32; scale 1 is the plain logits."""
    if scale == 1.0:
        return logits
    cond, uncond = logits[:batch].float(), logits[batch:].float()
    return uncond + scale * (cond - uncond)


def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None,
            top_p: float = 1.0) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): temperature, then top-k, then top-p (nucleus), then a multinomial draw.

    Top-p keeps the smallest set of most probable tokens whose probability (after temperature and top-k) reaches
    ``top_p``, and always the most probable one; ties are broken by token id, so the draw depends on the generator
    alone. ``top_p`` = 1 turns it off.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ranked, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = F.softmax(ranked, dim=-1)
        # Drop a token once the more probable ones before it already reach top_p; the first is never dropped.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def pad_text(token_lists: list[list[int]], text_len: int, text_vocab: int) -> torch.Tensor:
    """Truncate to ``text_len`` and fill position i with its own pad token ``text_vocab + i``."""
    out = torch.arange(text_len).repeat(len(token_lists), 1) + text_vocab
    for b, toks in enumerate(token_lists):
        toks = list(toks)[:text_len]
        if toks:
            out[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    return out


def empty_captions(batch: int, text_len: int, text_vocab: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``batch`` empty captions: all per-position pads, the same as ``pad_text([[]] * batch, ...)``."""
    return (torch.arange(text_len, device=device) + text_vocab).repeat(batch, 1)


def drop_captions(text: torch.Tensor, p: float, text_vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each row of ``text`` (B, T) by the empty caption with probability ``p`` (classifier-free guidance
    training). The draw uses ``generator`` (on its own device) so callers control determinism; p == 0 draws nothing
    and returns ``text`` itself."""
    if p == 0:
        return text
    drop = torch.rand(text.shape[0], generator=generator, device=generator.device).to(text.device) < p
    empty = empty_captions(1, text.shape[1], text_vocab, text.device)
    return torch.where(drop[:, None], empty, text)
