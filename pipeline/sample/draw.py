"""Drawing: ``draw`` samples image tokens for each caption with the KV-cached prior, decodes them with the dVAE
and reranks the candidates by CLIP similarity to the caption (``CaptionSamples``, best first)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.clip import model as clip_lib
from pipeline.dvae.model import DVAE
from pipeline.prior.transformer import DalleTransformer, pad_text

log = logging.getLogger(__name__)


@dataclass
class CaptionSamples:
    caption: str
    candidates: np.ndarray  # (K, H, W, 3) uint8, every candidate drawn, best first after the rerank
    clip_scores: np.ndarray  # (K,), same order
    draw_index: np.ndarray | None = None  # (K,): when each candidate was drawn (0 = first), same order
    keep: int = 1  # the first ``keep`` candidates are the ones the rerank keeps

    @property
    def kept(self) -> np.ndarray:
        return self.candidates[: self.keep]


def encode_captions(bpe: Any, captions: list[str], text_len: int) -> tuple[list[list[int]], dict[str, int]]:
    """BPE ids of each caption, cut to the prior's ``text_len``. Empty captions (they sample unconditionally) and
    truncated ones are logged by name and counted, never refused."""
    ids, empty, truncated = [], 0, 0
    for i, caption in enumerate(captions):
        toks = list(bpe.encode(caption))
        if not toks:
            empty += 1
            log.warning("sample: caption %d is empty: sampled unconditionally (the empty caption)", i)
        elif len(toks) > text_len:
            truncated += 1
            log.warning("sample: caption %r has %d BPE tokens, the prior reads %d: sampled from its first %d "
                        "tokens (CLIP still scores the whole caption)", caption, len(toks), text_len, text_len)
            toks = toks[:text_len]
        ids.append(toks)
    return ids, {"empty_captions": empty, "truncated_captions": truncated}


@torch.no_grad()
def draw(prior: DalleTransformer, dvae: DVAE, bundle: clip_lib.ClipBundle, captions: list[str], candidates: int,
         temperature: float, top_k: int, seed: int, batch: int = 64,
         guidance_scale: float = 1.0, top_p: float = 1.0, keep: int = 1) -> tuple[list[CaptionSamples], dict]:
    """``candidates`` samples per caption, reranked by CLIP similarity to the caption (best first); the first
    ``keep`` of each are the kept ones (every candidate stays in the result, for the records and grids).

    ``guidance_scale`` != 1 samples with classifier-free guidance (each batch runs twice as many rows); ``top_p`` < 1
    is nucleus sampling. Stats include the human-free measure of the rerank: ``clip_score_reranked`` (mean CLIP
    score of each caption's best candidate), ``clip_score_first`` (of its first-drawn one: what sampling without a
    rerank shows) and their difference ``rerank_gain`` (>= 0)."""
    if not 1 <= keep <= candidates:
        raise ValueError(f"keep: must be in [1, candidates={candidates}], got {keep}")
    s = prior.shape
    bpe = getattr(bundle.tokenizer, "tokenizer", bundle.tokenizer)
    ids, caption_stats = encode_captions(bpe, captions, s.text_len)
    text = pad_text(ids, s.text_len, s.text_vocab)
    text = text.repeat_interleave(candidates, dim=0)  # (C*K, T): caption c's candidates are rows c*K .. c*K+K-1
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    codes = torch.cat([prior.generate(text[i: i + batch], temperature, top_k, gen, guidance_scale=guidance_scale,
                                      top_p=top_p)
                       for i in range(0, len(text), batch)])
    gen_s = time.time() - t0
    images = dvae.decode(codes.view(-1, s.image_grid, s.image_grid))
    images = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (C*K, H, W, 3)
    img_emb = clip_lib.encode_images(bundle, images).reshape(len(captions), candidates, -1)
    txt_emb = clip_lib.encode_texts(bundle, captions)
    scores = np.einsum("ckd,cd->ck", img_emb, txt_emb)
    images = images.reshape(len(captions), candidates, *images.shape[1:])
    out = rerank(captions, images, scores, keep)
    stats = {"captions": len(captions), "samples": len(text), "generate_s": gen_s,
             "image_tokens_per_s": len(text) * s.image_len / max(gen_s, 1e-9), "guidance_scale": guidance_scale,
             "temperature": temperature, "top_k": top_k, "top_p": top_p, "candidates": candidates, "keep": keep,
             **caption_stats, **rerank_stats(out)}
    return out, stats


def rerank(captions: list[str], images: np.ndarray, scores: np.ndarray, keep: int) -> list[CaptionSamples]:
    """Per caption, its candidates (``images`` (C, K, H, W, 3) in draw order, ``scores`` (C, K)) best first; ties keep
    the draw order."""
    out = []
    for c, caption in enumerate(captions):
        order = np.argsort(-scores[c], kind="stable")
        out.append(CaptionSamples(caption, images[c][order], scores[c][order], order, keep))
    return out


def rerank_stats(results: list[CaptionSamples]) -> dict[str, float]:
    """Mean CLIP score of the candidate each caption keeps first (reranked) and of the one drawn first (what no rerank
    keeps); ``clip_score_mean`` over every candidate."""
    if not results:
        return {}
    best = [float(r.clip_scores[0]) for r in results]
    first = [float(r.clip_scores[_first_drawn(r)]) for r in results]
    reranked, plain = float(np.mean(best)), float(np.mean(first))
    return {"clip_score_reranked": reranked, "clip_score_first": plain, "rerank_gain": reranked - plain,
            "clip_score_mean": float(np.mean([r.clip_scores.mean() for r in results]))}


def _first_drawn(r: CaptionSamples) -> int:
    return 0 if r.draw_index is None else int(np.flatnonzero(r.draw_index == 0)[0])
