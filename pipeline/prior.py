"""DALL-E 1's autoregressive prior: one decoder-only transformer over [text tokens | image tokens].

Single-device model code (parallelism is applied from outside, by ``pipeline.ds_seam``). Text positions use DALL-E's
per-position padding tokens (the pad at position i is its own token ``text_vocab + i``), image positions get row and
column embeddings. The image loss predicts image token j from position ``text_len - 1 + j``; an optional text loss
(DALL-E weights it 1/8) reuses the text embedding matrix as its output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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

    @property
    def image_len(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len - 1


class SelfAttention(nn.Module):
    def __init__(self, s: PriorShape):
        super().__init__()
        self.n_head = s.n_head
        self.qkv = nn.Linear(s.n_embd, 3 * s.n_embd)
        self.proj = nn.Linear(s.n_embd, s.n_embd)
        self.dropout = s.dropout

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:
            if T != 1:
                raise ValueError("cached attention takes one new position at a time")
            # One new query attends to every cached position before it: no mask needed.
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None,
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

    def forward(self, x: torch.Tensor, past=None):
        a, kv = self.attn(self.ln1(x), past)
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

    def _run(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            past = cache[i] if cache is not None else None
            if self.activation_checkpointing and self.training and past is None:
                x, kv = checkpoint(block, x, use_reentrant=False)
            else:
                x, kv = block(x, past)
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

    def loss(self, text: torch.Tensor, image: torch.Tensor, text_loss_weight: float = 0.0) -> torch.Tensor:
        image_logits, text_logits = self(text, image, with_text=text_loss_weight > 0)
        loss = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]), image.reshape(-1))
        if text_logits is not None:
            t_loss = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), text[:, 1:].reshape(-1))
            loss = (loss + text_loss_weight * t_loss) / (1 + text_loss_weight)
        return loss

    @torch.no_grad()
    def generate(self, text: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample image codes (B, N) for padded text (B, T), one position at a time with a KV cache."""
        B, N = text.shape[0], self.shape.image_len
        h, cache = self._run(self._embed_text(text))
        logits = self.image_head(h[:, -1])
        out = torch.empty(B, N, dtype=torch.long, device=text.device)
        for j in range(N):
            out[:, j] = _sample(logits, temperature, top_k, generator)
            if j == N - 1:
                break
            h, cache = self._run(self._embed_image(out[:, j: j + 1], start=j), cache)
            logits = self.image_head(h[:, -1])
        return out

    @torch.no_grad()
    def generate_uncached(self, text: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """Reference sampler that recomputes the whole prefix each step (for tests and benchmarks)."""
        B, N = text.shape[0], self.shape.image_len
        out = torch.zeros(B, N, dtype=torch.long, device=text.device)
        for j in range(N):
            image_logits, _ = self(text, out[:, : j + 1], with_text=False)  # out[:, j]: placeholder, dropped
            out[:, j] = _sample(image_logits[:, j], temperature, top_k, generator)
        return out


def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def pad_text(token_lists: list[list[int]], text_len: int, text_vocab: int) -> torch.Tensor:
    """Truncate to ``text_len`` and fill position i with its own pad token ``text_vocab + i``."""
    out = torch.arange(text_len).repeat(len(token_lists), 1) + text_vocab
    for b, toks in enumerate(token_lists):
        toks = list(toks)[:text_len]
        if toks:
            out[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    return out
