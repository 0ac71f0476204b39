"""Captions → images: KV-cached sampling from the prior, dVAE decode, CLIP rerank, records people can look at.

``resolve_captions`` turns ``sample.captions`` (captions, or files of captions) into the list to draw;
``load_sampler_prior`` finds the autoregressive prior's weights (``<prior>/model.pt``, a model.pt, or a DeepSpeed
checkpoint folder exported on the fly) and refuses one that does not fit the run's tokenizer and dVAE; ``draw``
samples and reranks; ``write_samples`` writes per-caption grids, per-sample PNGs and ``samples.parquet``.
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.clip import model as clip_lib
from pipeline.demo import synth
from pipeline.dvae.model import DVAE
from pipeline.prior.transformer import DalleTransformer, PriorShape, pad_text

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


# --- captions ---------------------------------------------------------------------------------------------------


def resolve_captions(entries: list[str], fallback: Callable[[], list[str]], limit: int) -> list[str]:
    """The captions to draw: each entry naming an existing file adds its non-empty lines, any other entry is a caption
    itself (an empty string samples unconditionally). No captions at all → ``fallback()`` (the held-out captions),
    cut to ``limit``; captions given explicitly are all drawn."""
    out: list[str] = []
    for entry in entries:
        if entry and os.path.isfile(entry):
            with open(entry, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            found = [line for line in lines if line]
            log.info("sample: %d captions from %s", len(found), entry)
            if not found:
                log.warning("sample: caption file %s has no non-empty lines", entry)
            out += found
            continue
        if entry.endswith((".txt", ".csv", ".tsv")) or os.sep in entry:
            log.warning("sample: caption %r looks like a path but no such file exists; drawing it as a caption",
                        entry)
        out.append(entry)
    if not out:
        out = list(fallback())[:limit]
    return out


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


# --- loading ----------------------------------------------------------------------------------------------------


def load_sampler_prior(cfg: Any) -> tuple[DalleTransformer, dict[str, Any], str]:
    """(model in eval mode, its tokens_meta, the model.pt it came from) for ``sample.checkpoint``:

    * empty: ``<prior>/model.pt``, the weights train-prior writes at the end;
    * a file: that model.pt;
    * a DeepSpeed checkpoint folder (holding ``complete.json``, e.g. ``<prior>/step00000600``, any ZeRO stage and
      world size): consolidated offline by ``prior_ckpt.export_weights`` into ``<folder>/model.pt`` (an export
      already there is reused), then loaded; a folder holding a model.pt but no complete.json (a prior output
      folder) loads that model.pt.

    Raises FileNotFoundError for a missing checkpoint and ValueError (naming the path) for a file that is not an
    autoregressive prior or whose vocabularies / grid disagree with its own shape or with the run's token shards
    and dVAE.
    """
    path = _sampler_weights(cfg)
    model, meta = _load_ar_prior(path)
    check_tokens_meta(model.shape, meta, path)
    for what, expected, where in _run_reference(cfg):
        got = _meta_value(meta, what)
        if got is not None and expected is not None and int(got) != int(expected):
            raise ValueError(f"{path}: {_WHAT[what]} mismatch: the checkpoint was trained with {int(got)}, "
                             f"this run's {where} has {int(expected)}; sample with the run it was trained on, "
                             "or point sample.checkpoint at a prior of this run")
    return model, meta, path


_WHAT = {"text_vocab": "tokenizer vocabulary size", "image_vocab": "dVAE vocabulary size",
         "grid": "image token grid"}


def _sampler_weights(cfg: Any) -> str:
    """The model.pt path ``sample.checkpoint`` means (exporting a DeepSpeed checkpoint folder first)."""
    ckpt = cfg.sample.checkpoint
    if not ckpt:
        path = os.path.join(cfg.path("prior"), "model.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no prior weights (train-prior writes them at the end); run train-prior "
                                    "or set sample.checkpoint to a model.pt or a checkpoint folder "
                                    "(<prior>/stepNNNNNNNN)")
        return path
    if os.path.isdir(ckpt):
        folder = os.path.abspath(ckpt).rstrip(os.sep)
        if os.path.isfile(os.path.join(folder, "complete.json")):
            exported = os.path.join(folder, "model.pt")
            if os.path.isfile(exported) and (os.path.getmtime(exported)
                                             >= os.path.getmtime(os.path.join(folder, "complete.json"))):
                log.info("sample: reusing %s, exported earlier from checkpoint %s", exported, folder)
                return exported
            from pipeline.prior import checkpoints as prior_ckpt

            parent, tag = os.path.split(folder)
            log.info("sample: consolidating DeepSpeed checkpoint %s into %s", folder, exported)
            return prior_ckpt.export_weights(parent, tag)
        if os.path.isfile(os.path.join(folder, "model.pt")):
            return os.path.join(folder, "model.pt")
        raise ValueError(f"sample.checkpoint {ckpt}: a folder with neither complete.json (not a complete DeepSpeed "
                         "checkpoint: an interrupted save?) nor model.pt")
    if os.path.isfile(ckpt):
        return ckpt
    raise FileNotFoundError(f"sample.checkpoint {ckpt}: no such file or folder")


def _load_ar_prior(path: str) -> tuple[DalleTransformer, dict[str, Any]]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many exception types
        raise ValueError(f"{path}: cannot read prior weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or "shape" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path}: not a prior model.pt (no shape / state_dict)")
    kind = blob.get("kind", "ar")
    if kind != "ar":
        raise ValueError(f"{path}: a {kind!r} prior (it predicts CLIP image embeddings, DALL-E 2's); sampling images "
                         "needs the autoregressive prior (prior.kind=ar, <run_dir>/prior)")
    try:
        model = DalleTransformer(PriorShape(**blob["shape"]))
        model.load_state_dict(blob["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: weights do not fit an autoregressive prior ({exc})") from exc
    return model.eval(), dict(blob.get("tokens_meta") or {})


def _meta_value(meta: dict[str, Any], what: str) -> Any:
    if what == "text_vocab":
        return (meta.get("tokenizer") or {}).get("vocab_size")
    if what == "image_vocab":
        return (meta.get("dvae") or {}).get("vocab_size")
    return meta.get("grid")


def check_tokens_meta(shape: PriorShape, meta: dict[str, Any], path: str) -> None:
    """The checkpoint's model shape agrees with the tokens it records training on."""
    have = {"text_vocab": shape.text_vocab, "image_vocab": shape.image_vocab, "grid": shape.image_grid}
    for what, size in have.items():
        recorded = _meta_value(meta, what)
        if recorded is not None and int(recorded) != size:
            raise ValueError(f"{path}: {_WHAT[what]} mismatch: the model has {size}, its tokens_meta records "
                             f"{int(recorded)}")


def _run_reference(cfg: Any) -> list[tuple[str, int | None, str]]:
    """What this run's tokenizer and dVAE say: (what, size, where) from its token shards and its dvae.pt, for those
    that exist (a checkpoint sampled outside its run has nothing to be checked against here)."""
    from pipeline.storage import commit, schema

    refs: list[tuple[str, int | None, str]] = []
    try:
        fs, folder = commit.fs_and_path(cfg.path("tokens"))
        shards = commit.committed_shards(fs, folder)
        first = f"{folder}/{next(iter(shards)):05d}.parquet" if shards else ""
        meta = schema.read_metadata(fs, first) if shards else None
    except Exception as exc:  # noqa: BLE001 - an unreachable store or an unreadable shard only skips this check
        log.warning("sample: cannot read the run's token shard metadata under %s (%s); tokenizer check skipped",
                    cfg.path("tokens"), exc)
        meta = None
    if meta is not None:
        where = f"token shards ({first})"
        refs += [(w, _meta_value(meta, w), where) for w in ("text_vocab", "image_vocab", "grid")]
    dvae_path = os.path.join(cfg.path("dvae"), "dvae.pt")
    if os.path.isfile(dvae_path):
        from pipeline.dvae.model import DVAEShape

        try:
            blob = torch.load(dvae_path, map_location="cpu", weights_only=True)
            dshape = DVAEShape(**blob["shape"])
        except Exception as exc:  # noqa: BLE001 - sample() loads and reports it properly
            log.warning("sample: cannot read the run's dVAE %s (%s); dVAE check skipped", dvae_path, exc)
        else:
            where = f"dVAE ({dvae_path})"
            refs += [("image_vocab", dshape.vocab_size, where),
                     ("grid", dshape.grid(cfg.download.image_size), f"{where} at download.image_size "
                                                                     f"{cfg.download.image_size}")]
    return refs


def check_models(prior: DalleTransformer, source: str, dvae: DVAE, bpe: Any, image_size: int) -> None:
    """The dVAE and tokenizer actually used for sampling fit the prior (vocabularies and grid)."""
    s = prior.shape
    text_vocab = int(getattr(bpe, "vocab_size", 49408))
    checks = [("text_vocab", s.text_vocab, text_vocab, "CLIP tokenizer"),
              ("image_vocab", s.image_vocab, dvae.shape.vocab_size, "dVAE"),
              ("grid", s.image_grid, dvae.shape.grid(image_size), f"dVAE at image size {image_size}")]
    for what, have, other, name in checks:
        if have != other:
            raise ValueError(f"{source}: {_WHAT[what]} mismatch: the prior has {have}, the {name} used for "
                             f"sampling has {other}")


# --- drawing ----------------------------------------------------------------------------------------------------


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


# --- records ----------------------------------------------------------------------------------------------------

CELL = 96  # displayed pixels per image in the per-caption grids
SETTINGS = ("seed", "temperature", "top_k", "top_p", "guidance_scale")


def write_samples(results: list[CaptionSamples], out_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Per caption ``idx``: ``samples/<idx:03d>.png``, every candidate best first labelled with its CLIP score (kept
    ones outlined green), and ``samples/<idx:03d>/<rank>.png`` each candidate at its own resolution. One row per
    candidate in ``samples.parquet`` and ``samples.json``: caption, caption_index, rank, kept, clip_score,
    draw_index, the sampling ``settings`` (seed, temperature, top_k, top_p, guidance_scale, and any other key given)
    and image_path (relative to ``out_dir``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    missing = [k for k in SETTINGS if k not in settings]
    if missing:
        raise ValueError(f"write_samples: settings lack {missing}")
    out = Path(out_dir)
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for idx, r in enumerate(results):
        sub = folder / f"{idx:03d}"
        sub.mkdir(exist_ok=True)
        for rank, img in enumerate(r.candidates):
            rel = f"samples/{idx:03d}/{rank}.png"
            Image.fromarray(img).save(out / rel)
            rows.append({"caption": r.caption, "caption_index": idx, "rank": rank, "kept": rank < r.keep,
                         "clip_score": float(r.clip_scores[rank]),
                         "draw_index": int(r.draw_index[rank]) if r.draw_index is not None else rank,
                         **{k: settings[k] for k in SETTINGS},
                         **{k: v for k, v in settings.items() if k not in SETTINGS},
                         "image_path": rel})
        caption_grid(r, str(folder / f"{idx:03d}.png"))
    fields = [("caption", pa.string()), ("caption_index", pa.int32()), ("rank", pa.int32()), ("kept", pa.bool_()),
              ("clip_score", pa.float32()), ("draw_index", pa.int32()), ("seed", pa.int64()),
              ("temperature", pa.float32()), ("top_k", pa.int32()), ("top_p", pa.float32()),
              ("guidance_scale", pa.float32())]
    known = {name for name, _ in fields}
    extra = [k for k in (rows[0] if rows else {}) if k not in known and k != "image_path"]
    schema = pa.schema(fields + [(k, pa.string()) for k in extra] + [("image_path", pa.string())])
    table = pa.Table.from_pylist([{**row, **{k: str(row[k]) for k in extra}} for row in rows], schema=schema)
    pq.write_table(table, out / "samples.parquet")
    (out / "samples.json").write_text(json.dumps(rows, indent=1))
    return {"samples_parquet": str(out / "samples.parquet"), "samples_json": str(out / "samples.json"),
            "sample_grids": len(results), "sample_images": len(rows),
            "kept_images": sum(row["kept"] for row in rows)}


def caption_grid(r: CaptionSamples, path: str, per_row: int = 8) -> None:
    """The caption on top, then every candidate best first, each labelled with its rank and CLIP score."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, label_h, head_h = 4, 14, 18
    k = len(r.candidates)
    cols = max(1, min(per_row, k))
    rows = (k + cols - 1) // cols
    width = max(cols * (CELL + pad) + pad, 240)
    chars = max(20, width // 6)
    head = textwrap.wrap(r.caption, chars) or ["(empty caption: unconditional)"]
    top = pad + head_h * len(head)
    grid = Image.new("RGB", (width, top + rows * (CELL + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(head):
        draw.text((pad, pad + i * head_h), line, fill=(0, 0, 0), font=font)
    for rank, img in enumerate(r.candidates):
        x = pad + (rank % cols) * (CELL + pad)
        y = top + (rank // cols) * (CELL + label_h + pad)
        grid.paste(Image.fromarray(img).resize((CELL, CELL), Image.NEAREST), (x, y))
        kept = rank < r.keep
        if kept:
            draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], outline=(0, 200, 0), width=3)
        draw.text((x, y + CELL + 1), f"#{rank} {float(r.clip_scores[rank]):.3f}{' kept' if kept else ''}",
                  fill=(0, 120, 0) if kept else (0, 0, 0), font=font)
    grid.save(path)


def faithfulness(results: list[CaptionSamples]) -> dict[str, float]:
    """How often the reranked sample shows the caption's colour / position, read back from pixels, vs chance."""
    colour = position = both = n = 0
    colour_any = 0
    for r in results:
        attrs = synth.parse_caption(r.caption)
        if attrs is None:
            continue
        n += 1
        got_colour, got_pos = synth.read_attributes(r.candidates[0])
        colour += got_colour == attrs["colour"]
        position += got_pos == attrs["position"]
        both += got_colour == attrs["colour"] and got_pos == attrs["position"]
        colour_any += sum(synth.read_attributes(c)[0] == attrs["colour"] for c in r.candidates) / len(r.candidates)
    if n == 0:
        raise ValueError("no caption of the embedded dataset among the samples: nothing to score")
    return {"scored": n, "match": colour / n, "chance": 1 / len(synth.COLOURS),
            "position_match": position / n, "position_chance": 1 / len(synth.POSITIONS),
            "colour_and_position_match": both / n, "match_before_rerank": colour_any / n}
