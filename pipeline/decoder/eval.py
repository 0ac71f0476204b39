"""``python -m pipeline eval-decoder``: score DALL-E 2's decoder (CLIP image embedding → pixels) on held-out rows.

The rows are the priors' held-out split (``heldout_mask`` of the key, ``decoder.heldout_percent``): training never
saw them. For the first ``decoder.eval_rows`` by key, images are decoded twice, from the row's true CLIP image
embedding (the decoder alone) and from the diffusion prior's embedding of its caption (the DALL-E 2 chain; skipped,
and said so, when the run has no diffusion prior). Each set is scored, beside the baselines it must beat:

* CLIP similarity of the decoded image to its caption, against random dataset images (the same caption, an image
  drawn at random from the training rows) and the original image (what a perfect decoder would reach);
* CLIP similarity of the decoded image to the embedding it was decoded from (the true one: a reconstruction), against
  random dataset images;
* on the embedded dataset, colour / shape / position / background read from the pixels against the caption
  (``synth.score_attributes``), beside each attribute's chance level and the random images' score.

Writes ``<decoder>/eval/eval.json`` and ``reconstructions.png`` (caption, original, decoded from the true embedding,
decoded from the prior's) through the storage helpers, so the decoder folder may be a URL.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.clip import model as clip_lib
from pipeline.decoder import sampling
from pipeline.demo import synth
from pipeline.errors import DataError, InputError, NotFoundError
from pipeline.prior.checkpoints import load_prior
from pipeline.prior.eval import load_images, read_columns
from pipeline.prior.rows import heldout_mask
from pipeline.prior.transformer import pad_text
from pipeline.storage.commit import atomic_output
from pipeline.storage.urls import join, write_json

CELL, PAD, LABEL_W, GRID_ROWS = 96, 4, 250, 8
COLUMNS = ("original", "from true image emb", "from prior's emb")


@dataclass
class HeldOut:
    keys: list[str]
    captions: list[str]
    tokens: list[list[int]]
    image_emb: np.ndarray  # (N, D) the rows' stored CLIP image embeddings
    text_emb: np.ndarray  # (N, D) their stored CLIP text embeddings (what the prior was trained on)
    random_keys: list[str]  # one training row per held-out row, drawn with the run's seed: the random baseline
    meta: dict[str, Any]


def _matrix(table: Any, column: str, rows: np.ndarray) -> np.ndarray:
    arr = table.column(column).take(rows).combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), -1)


def heldout_rows(cfg: Any, limit: int) -> HeldOut:
    """The first ``limit`` held-out rows by key with finite, non-zero embeddings, and the random-baseline keys."""
    folder, percent = cfg.path("tokens"), float(cfg.decoder.heldout_percent)
    table, meta = read_columns(folder, ["key", "caption", "text_tokens", "clip_image_emb", "clip_text_emb"])
    keys = table.column("key").to_pylist()
    mask = heldout_mask(keys, percent)
    held = np.flatnonzero(mask)
    if not held.size:
        raise DataError(f"{folder}: no held-out rows among {len(keys)} at decoder.heldout_percent={percent}; raise "
                        "decoder.heldout_percent (and train with it: these rows must be unseen)")
    emb = _matrix(table, "clip_image_emb", held)
    ok = np.isfinite(emb).all(1) & (np.abs(emb).sum(1) > 0)
    rows = np.asarray(sorted(held[ok], key=lambda i: keys[i])[:limit], dtype=np.int64)
    if not rows.size:
        raise DataError(f"{folder}: all {held.size} held-out rows have NaN/inf or zero CLIP image embeddings")
    train = np.flatnonzero(~mask)
    if not train.size:
        raise DataError(f"{folder}: every row is held out; nothing to draw the random-image baseline from")
    pick = np.random.default_rng(cfg.seed).choice(train, size=len(rows), replace=len(train) < len(rows))
    return HeldOut([keys[i] for i in rows], [table.column("caption")[int(i)].as_py() or "" for i in rows],
                   [table.column("text_tokens")[int(i)].as_py() or [] for i in rows],
                   _matrix(table, "clip_image_emb", rows), _matrix(table, "clip_text_emb", rows),
                   [keys[i] for i in pick], meta)


def _prior_embeddings(cfg: Any, decoder: Any, decoder_meta: dict[str, Any], decoder_path: str,
                      rows: HeldOut) -> tuple[np.ndarray | None, str]:
    """The diffusion prior's image embeddings of the rows' captions (its DDIM settings from ``sample.*``), or
    (None, why) when the run has no diffusion prior."""
    try:
        path = sampling.diffusion_prior_weights(cfg)
    except NotFoundError as exc:
        return None, str(exc)
    prior, meta = load_prior(path, "diffusion")
    sampling.check_pair(prior, meta, path, decoder, decoder_meta, decoder_path)
    dev, sc = next(decoder.parameters()).device, cfg.sample
    text = pad_text(rows.tokens, prior.shape.text_len, prior.shape.text_vocab).to(dev)
    gen = torch.Generator(dev).manual_seed(cfg.seed)
    out = prior.to(dev).sample(text, torch.from_numpy(rows.text_emb).to(dev), steps=sc.diffusion_steps,
                               sampler=sc.diffusion_sampler, guidance_scale=sc.guidance_scale,
                               candidates=sc.diffusion_candidates, generator=gen)
    return out.float().cpu().numpy(), path


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    return np.sum(a * (b / np.linalg.norm(b, axis=1, keepdims=True)), axis=1)


def score_images(bundle: Any, images: np.ndarray, text_emb: np.ndarray, image_emb: np.ndarray,
                 captions: list[str]) -> dict[str, Any]:
    """Mean CLIP cosine of ``images`` to their captions (``text_emb``) and to ``image_emb``, and the pixel read."""
    emb = clip_lib.encode_images(bundle, images)
    return {"clip_to_caption": float(_cos(emb, text_emb).mean()),
            "clip_to_image_emb": float(_cos(emb, image_emb).mean()),
            "pixels": synth.score_attributes(list(images), captions)}


def reconstruction_grid(captions: list[str], columns: list[np.ndarray | None], path: str) -> str:
    """One row per caption: the wrapped caption, then the original and the decoded images (a missing column is left
    blank); column titles on top. Written atomically (a local path or the run's storage)."""
    font = ImageFont.load_default()
    n, head = len(captions), 16
    grid = Image.new("RGB", (LABEL_W + len(COLUMNS) * (CELL + PAD) + PAD, head + n * (CELL + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(COLUMNS):
        draw.text((LABEL_W + c * (CELL + PAD), 2), title, fill=(0, 0, 0), font=font)
    for r, caption in enumerate(captions):
        y = head + PAD + r * (CELL + PAD)
        for j, line in enumerate(textwrap.wrap(caption, width=38)[: CELL // 12]):
            draw.text((4, y + j * 12), line, fill=(0, 0, 0), font=font)
        for c, col in enumerate(columns):
            if col is not None:
                tile = Image.fromarray(np.asarray(col[r], np.uint8)).resize((CELL, CELL), Image.NEAREST)
                grid.paste(tile, (LABEL_W + c * (CELL + PAD), y))
    with atomic_output(path) as f:
        grid.save(f, format="PNG")
    return path


def _originals(cfg: Any, rows: HeldOut, size: int) -> tuple[np.ndarray, np.ndarray]:
    images_folder = cfg.path("images")
    found = load_images(images_folder, size, set(rows.keys) | set(rows.random_keys))
    missing = sorted((set(rows.keys) | set(rows.random_keys)) - set(found))
    if missing:
        raise DataError(f"{images_folder}: {len(missing)} evaluated rows have no image (first {missing[:3]}); "
                        "evaluate with the image shards the tokens were made from")
    return np.stack([found[k] for k in rows.keys]), np.stack([found[k] for k in rows.random_keys])


def eval_decoder(cfg: Any, limit: int | None = None) -> dict[str, Any]:
    """Evaluate on ``limit`` (default ``decoder.eval_rows``) held-out rows; see the module doc."""
    t0 = time.time()
    decoder, decoder_meta, decoder_path, bundle = sampling.load_decoder_and_clip(cfg)
    rows = heldout_rows(cfg, limit or cfg.decoder.eval_rows)
    s, folder = decoder.shape, cfg.path("tokens")
    width = int(rows.meta.get("embed_dim") or rows.image_emb.shape[1])
    if width != s.embed_dim:
        raise InputError(f"{decoder_path}: the decoder was built for {s.embed_dim}-d CLIP embeddings, {folder} holds "
                         f"{width}-d ones; evaluate with the tokens it was trained on")
    a, b = rows.meta.get("clip"), decoder_meta.get("clip")
    if a and b and a != b:
        raise InputError(f"{decoder_path}: trained on embeddings of CLIP {b}, but {folder} was made with {a}")
    originals, randoms = _originals(cfg, rows, s.image_size)
    dev = next(decoder.parameters()).device
    text = pad_text([t[: s.text_len] for t in rows.tokens], s.text_len, s.text_vocab).to(dev) \
        if s.conditioned_on_text else None

    def decode(emb: np.ndarray) -> np.ndarray:
        gen = torch.Generator(dev).manual_seed(cfg.seed)  # the same noise for both sources: only the embedding differs
        return sampling.decode_images(decoder, torch.from_numpy(emb).to(dev), text, cfg, gen)

    t_dec = time.time()
    from_true = decode(rows.image_emb)
    decode_s = time.time() - t_dec
    prior_emb, prior_source = _prior_embeddings(cfg, decoder, decoder_meta, decoder_path, rows)
    from_prior = decode(prior_emb) if prior_emb is not None else None
    text_emb = clip_lib.encode_texts(bundle, rows.captions)
    score = {"true_emb": score_images(bundle, from_true, text_emb, rows.image_emb, rows.captions),
             "random_images": score_images(bundle, randoms, text_emb, rows.image_emb, rows.captions),
             "originals": score_images(bundle, originals, text_emb, rows.image_emb, rows.captions)}
    if from_prior is not None:
        score["prior_emb"] = score_images(bundle, from_prior, text_emb, rows.image_emb, rows.captions)
    out = join(cfg.path("decoder"), "eval")
    n = min(GRID_ROWS, len(rows.keys))
    png = reconstruction_grid(rows.captions[:n], [originals[:n], from_true[:n],
                                                  None if from_prior is None else from_prior[:n]],
                              join(out, "reconstructions.png"))
    result = {**headline(score), "scores": score, "evaluated": len(rows.keys), "heldout_percent":
              cfg.decoder.heldout_percent, "decoder_checkpoint": decoder_path, "prior": prior_source,
              "sampler": cfg.sample.decoder_sampler, "steps": cfg.sample.decoder_steps,
              "guidance_scale": cfg.sample.decoder_guidance_scale, "image_size": s.image_size,
              "images_per_s": len(rows.keys) / max(decode_s, 1e-9), "keys": rows.keys,
              "reconstructions_png": png, "eval_json": join(out, "eval.json"), "seconds": round(time.time() - t0, 2)}
    write_json(join(out, "eval.json"), result)
    return result


def headline(score: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures the report and the summary show: CLIP to caption per source, and the pixel read's all-four and
    colour matches per source with their chance levels."""
    out: dict[str, Any] = {}
    for source, s in score.items():
        out[f"clip_{source}"] = s["clip_to_caption"]
        out[f"clip_image_{source}"] = s["clip_to_image_emb"]
        px = s["pixels"]
        if px.get("scored"):
            out[f"pixel_{source}_colour_match"] = px["colour_match"]
            out[f"pixel_{source}_all_match"] = px["all_match"]
            out["pixel_colour_chance"], out["pixel_all_chance"] = px["colour_chance"], px["all_chance"]
    if "prior_emb" in score:
        out["beats_random_baseline"] = bool(score["prior_emb"]["clip_to_caption"] >
                                            score["random_images"]["clip_to_caption"])
    return out


def eval_decoder_summary(cfg: Any) -> dict[str, Any]:
    """``eval_decoder``'s headline figures and where the full result and the grid are."""
    result = eval_decoder(cfg)
    keep = ("evaluated", "images_per_s", "eval_json", "reconstructions_png")
    return {k: v for k, v in result.items() if k.startswith(("clip_", "pixel_", "beats_")) or k in keep}
