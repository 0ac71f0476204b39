"""``python -m pipeline eval-prior``: score a DALL-E 2 diffusion prior (CLIP text embedding → CLIP image embedding).

Held-out rows are chosen by a hash of the sample key alone (``heldout_mask``), so the set does not move when shards
are re-cut, ranks change or rows are re-ordered, and the training loader skips exactly these rows with the same rule.
Figures, each next to the baseline it must beat:

* cosine of the predicted image embedding with the true one, against the cosine of the caption's own CLIP text
  embedding with the true image embedding (the "do nothing" prior), and against an unconditional prediction
  (guidance_scale 0: the prior without its caption);
* retrieval: recall@1 / recall@k of the true image among the dataset's images nearest to the prediction, against the
  same for the text embedding; chance is k / index size;
* what was retrieved (``score_retrievals``): the nearest image to the prediction, to the text embedding and a random
  dataset image, each scored by CLIP similarity to the caption and (embedded dataset) by the colour, shape, position
  and background read from its pixels, beside each attribute's chance level. On a set where many images are
  identical renders of one caption, exact-image recall cannot separate a prior from its text baseline; these can.

Writes ``<prior>/eval/eval.json`` and ``retrieval.png`` (captions beside their nearest dataset images, truth outlined).
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import DataError, InputError
from pipeline.prior.rows import heldout_mask  # the training loader's split, shared
from pipeline.storage import commit, schema, shards
from pipeline.storage.commit import atomic_output
from pipeline.storage.urls import join

Predict = Callable[[list[str], np.ndarray, np.ndarray, float], np.ndarray]
CELL, PAD, LABEL_W = 96, 4, 260  # displayed pixels per image, gap, caption panel width
GRID_CAPTIONS, GRID_K = 8, 5
EMB_COLUMNS = ("clip_image_emb", "clip_text_emb")


def _unit(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an (N, D) matrix, got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norm[:, 0]) | (norm[:, 0] == 0))
    if bad.size:
        raise ValueError(f"{name}: {bad.size} rows are NaN/inf or zero (first rows {bad[:5].tolist()})")
    return x / norm


def cosine_figures(pred: np.ndarray, true_image: np.ndarray, text: np.ndarray,
                   uncond_pred: np.ndarray | None) -> dict[str, Any]:
    """Mean cosines with the true image embedding: of the prediction, of the text embedding (the baseline a prior
    must beat, since it could just echo its input) and of the unconditional prediction."""
    true = _unit(true_image, "true_image")
    mats = {"pred": pred, "text": text} | ({"uncond_pred": uncond_pred} if uncond_pred is not None else {})
    cos = {}
    for name, m in mats.items():
        if np.shape(m) != true.shape:
            raise ValueError(f"{name} has shape {np.shape(m)}, true_image has {true.shape}")
        cos[name] = float(np.mean(np.sum(_unit(m, name) * true, axis=1)))
    return {"cos_pred_image": cos["pred"], "cos_text_image": cos["text"], "cos_uncond_image": cos.get("uncond_pred"),
            "beats_text_baseline": bool(cos["pred"] > cos["text"]), "n": len(true)}


class RetrievalIndex:
    """Nearest dataset images to a query embedding: exact inner product over l2-normalised float32 CLIP image
    embeddings with faiss (``IndexFlatIP``), so scores are cosines. For very large sets autofaiss (which reads the
    ``python -m pipeline export`` layout) builds compressed approximate indexes; evaluation uses an exact flat index
    so recall figures carry no approximation error."""

    def __init__(self, embeddings: np.ndarray, keys: Sequence[str]):
        import faiss  # lazily: only evaluation needs it

        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(keys):
            raise ValueError(f"embeddings have shape {emb.shape}, expected ({len(keys)}, D) for {len(keys)} keys")
        norm = np.linalg.norm(emb, axis=1)
        bad = np.flatnonzero(~np.isfinite(norm) | (norm == 0))
        if bad.size:
            raise ValueError(f"{bad.size} embeddings are NaN/inf or zero (keys {[keys[i] for i in bad[:5]]}); "
                             f"they cannot be normalised")
        self.keys, self.dim, self.skipped = list(keys), int(emb.shape[1]), 0
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(np.ascontiguousarray(emb / norm[:, None]))

    @classmethod
    def from_tokens(cls, folder: str) -> RetrievalIndex:
        """Every committed row's ``clip_image_emb``; NaN/inf or zero rows are skipped and counted in ``.skipped``."""
        table, _ = read_columns(folder, ["key", "clip_image_emb"])
        return cls._from_arrays(table.column("key").to_pylist(), _matrix(table, "clip_image_emb"))

    @classmethod
    def _from_arrays(cls, keys: list[str], emb: np.ndarray) -> RetrievalIndex:
        norm = np.linalg.norm(emb.astype(np.float32), axis=1)
        ok = np.isfinite(norm) & (norm > 0)
        out = cls(emb[ok], [k for k, good in zip(keys, ok) if good])
        out.skipped = int((~ok).sum())
        return out

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` nearest keys per query and their cosines, best first."""
        q = _unit(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index holds {self.dim}-d embeddings")
        k = min(k, len(self.keys))  # faiss pads with -1 beyond ntotal
        scores, ids = self.index.search(np.ascontiguousarray(q), k)
        return [[self.keys[i] for i in row] for row in ids], scores


def read_columns(folder: str, columns: list[str]) -> tuple[Any, dict[str, Any]]:
    """``schema.read_token_shards`` after checking, from each committed shard's footer, that it has ``columns``
    (pyarrow's own error would not say which shard, nor that the token stage was too old)."""
    fs, path = commit.fs_and_path(folder)
    for shard_id, manifest in commit.committed_shards(fs, path).items():
        p = commit.shard_file(path, shard_id, ".parquet", manifest)
        with fs.open(p, "rb") as f:
            missing = [c for c in columns if c not in pq.ParquetFile(f).schema_arrow.names]
        if missing:
            raise DataError(f"{p}: token shard lacks columns {missing}; re-run tokenize to add CLIP embeddings")
    return schema.read_token_shards(folder, columns)


def _matrix(table: Any, column: str) -> np.ndarray:
    arr = table.column(column).combine_chunks()
    if arr.null_count:
        raise ValueError(f"{column} has {arr.null_count} null rows")
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), -1)


def _draw_tile(img: np.ndarray | None, key: str, font: Any) -> Image.Image:
    if img is None:  # an image not found in the image shards: a labelled placeholder keeps the row readable
        tile = Image.new("RGB", (CELL, CELL), (160, 160, 160))
        ImageDraw.Draw(tile).text((4, CELL // 2 - 6), key[-14:], fill=(0, 0, 0), font=font)
        return tile
    return Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((CELL, CELL), Image.NEAREST)


def retrieval_grid(captions: Sequence[str], neighbours: Sequence[Sequence[str]], images: Mapping[str, np.ndarray],
                   path: str, truth: Sequence[str] | None = None) -> str:
    """One row per caption: the wrapped caption, then its nearest images (best first); the true image is outlined
    green when retrieved. Keys missing from ``images`` are drawn as gray placeholders. Written atomically."""
    font = ImageFont.load_default()
    k = max((len(n) for n in neighbours), default=0)
    grid = Image.new("RGB", (LABEL_W + k * (CELL + PAD) + PAD, len(captions) * (CELL + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (caption, keys) in enumerate(zip(captions, neighbours)):
        y = PAD + r * (CELL + PAD)
        lines = textwrap.wrap(caption, width=40)[: CELL // 12] or [""]
        for j, line in enumerate(lines):
            draw.text((4, y + j * 12), line, fill=(0, 0, 0), font=font)
        for c, key in enumerate(keys):
            x = LABEL_W + c * (CELL + PAD)
            grid.paste(_draw_tile(images.get(key), key, font), (x, y))
            if truth is not None and key == truth[r]:
                draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], outline=(0, 200, 0), width=3)
    with atomic_output(path) as f:  # a local path or the run's storage
        grid.save(f, format="PNG")
    return path


def _recall(neigh: list[list[str]], keys: Sequence[str]) -> tuple[float, float]:
    at1 = np.mean([bool(n) and n[0] == key for n, key in zip(neigh, keys)])
    atk = np.mean([key in n for n, key in zip(neigh, keys)])
    return float(at1), float(atk)


def evaluate_predictions(keys: Sequence[str], captions: Sequence[str], pred: np.ndarray, true_image: np.ndarray,
                         text: np.ndarray, uncond_pred: np.ndarray | None, index: RetrievalIndex,
                         k: int = 5) -> dict[str, Any]:
    """``cosine_figures`` plus recall@1 / recall@k of each row's own image (by key) among the index's nearest
    neighbours of the prediction, of the text embedding (baseline) and of the unconditional prediction. The
    prediction's neighbours come back under ``neighbours`` (for the grid); a truth not in the index counts as a miss
    and is counted in ``truth_not_indexed``."""
    if not len(keys) == len(captions) == len(pred):
        raise ValueError(f"{len(keys)} keys, {len(captions)} captions and {len(pred)} predictions: must be equal")
    out = cosine_figures(pred, true_image, text, uncond_pred)
    indexed = set(index.keys)
    neigh, _ = index.search(pred, k)
    out["recall_at_1"], out["recall_at_k"] = _recall(neigh, keys)
    out["text_recall_at_1"], out["text_recall_at_k"] = _recall(index.search(text, k)[0], keys)
    if uncond_pred is not None:
        out["uncond_recall_at_1"], out["uncond_recall_at_k"] = _recall(index.search(uncond_pred, k)[0], keys)
    out.update(k=k, chance_recall_at_k=min(1.0, k / max(len(index), 1)), index_rows=len(index),
               truth_not_indexed=sum(key not in indexed for key in keys), neighbours=neigh)
    return out


def load_images(folder: str, size: int, wanted: set[str]) -> dict[str, np.ndarray]:
    """Decoded images for ``wanted`` keys. Same reading path as ``shards.iter_images``, but only the wanted samples
    are decoded and reading stops once all are found: a grid needs ~48 images, not the whole dataset decoded."""
    found: dict[str, np.ndarray] = {}
    for shard_id in shards.committed_image_shards(folder):
        for s in shards.read_shard_samples(folder, shard_id):
            if s["key"] in wanted and s["image"]:
                found[s["key"]] = shards.decode_image(s["image"], size)
        if len(found) == len(wanted):
            break
    return found


def score_retrievals(picks: Mapping[str, Sequence[str]], captions: Sequence[str], text: np.ndarray,
                     images: Mapping[str, np.ndarray], emb: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per source (the prior's nearest image, the text embedding's, a random one): CLIP similarity of the picked
    image's stored embedding to the caption's, and the attributes read from its pixels against the caption
    (``synth.score_attributes``, embedded dataset). Exact-image recall cannot tell these apart on a set where many
    images are identical renders of one caption; attributes and CLIP similarity can."""
    from pipeline.demo import synth

    t = _unit(text, "text")
    out: dict[str, Any] = {}
    for source, keys in picks.items():
        got = [(i, k) for i, k in enumerate(keys) if k in images]  # an image missing from the shards is not scored
        cos = [float(_unit(emb[k][None], k)[0] @ t[i]) for i, k in got]
        out[source] = {"clip_to_caption": float(np.mean(cos)) if cos else None, "missing_images": len(keys) - len(got),
                       "pixels": synth.score_attributes([images[k] for _, k in got], [captions[i] for i, _ in got])}
    return out


def _model_predict(cfg: Any, meta: dict[str, Any], embed_dim: int, folder: str) -> tuple[Predict, dict[str, Any], Any]:
    """``predict`` from ``<prior>/model.safetensors``: DDIM sampling, generator seeded with cfg.seed for repeatable
    figures."""
    import torch

    from pipeline.prior.checkpoints import PRIOR_REEXPORT, load_prior
    from pipeline.storage import weights

    ckpt = join(cfg.path("prior"), weights.MODEL_FILE)
    weights.require(ckpt, f"{ckpt}: no diffusion prior to evaluate (train-prior prior.kind=diffusion writes it)",
                    PRIOR_REEXPORT)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, trained_on = load_prior(str(ckpt), "diffusion")
    model = model.to(device).eval()
    if int(model.shape.embed_dim) != embed_dim:
        raise InputError(f"{ckpt}: model embed_dim {model.shape.embed_dim} but {folder} holds {embed_dim}-d CLIP "
                         f"embeddings; evaluate with the tokens it was trained on")
    # Same width is not enough: embeddings of another CLIP live in another space and every figure would be noise.
    if trained_on.get("clip") and meta.get("clip") and trained_on["clip"] != meta["clip"]:
        raise InputError(f"{ckpt}: trained on CLIP {trained_on['clip']}, but {folder} was made with {meta['clip']}")
    steps = int(getattr(cfg.sample, "diffusion_steps", 64))

    @torch.no_grad()
    def predict(captions: list[str], tokens: np.ndarray, text_emb: np.ndarray, scale: float) -> np.ndarray:
        gen = torch.Generator(device).manual_seed(cfg.seed)
        out = model.sample(torch.from_numpy(tokens).to(device), torch.from_numpy(text_emb).to(device), steps=steps,
                           sampler="ddim", guidance_scale=scale, generator=gen)
        return out.float().cpu().numpy()

    return predict, {"checkpoint": str(ckpt), "steps": steps, "sampler": "ddim"}, model


def eval_prior(cfg: Any, predict: Predict | None = None, limit: int = 256) -> dict[str, Any]:
    """Evaluate on up to ``limit`` held-out rows (sorted by key) of ``cfg.path('tokens')``; see the module doc."""
    from pipeline.prior.transformer import pad_text

    t0 = time.time()
    folder = cfg.path("tokens")
    percent = float(getattr(cfg.prior, "heldout_percent", 5.0))
    table, meta = read_columns(folder, ["key", "caption", "text_tokens", *EMB_COLUMNS])
    keys = table.column("key").to_pylist()
    held = np.flatnonzero(heldout_mask(keys, percent))
    if not held.size:
        raise DataError(f"{folder}: no held-out rows among {len(keys)} at prior.heldout_percent={percent}; "
                         f"raise prior.heldout_percent")
    img_all, txt_all = _matrix(table, "clip_image_emb"), _matrix(table, "clip_text_emb")
    embed_dim = int(meta.get("embed_dim") or img_all.shape[1])
    # Held-out rows whose stored embeddings cannot be normalised have no truth to score against: counted, not used.
    good = np.isfinite(img_all[held]).all(1) & np.isfinite(txt_all[held]).all(1) \
        & (np.abs(img_all[held]).sum(1) > 0) & (np.abs(txt_all[held]).sum(1) > 0)
    usable = sorted(held[good], key=lambda i: keys[i])[:limit]  # by key: independent of shard layout
    if not usable:
        raise DataError(f"{folder}: all {held.size} held-out rows have NaN/inf or zero CLIP embeddings")
    rows = np.asarray(usable)
    ev_keys = [keys[i] for i in rows]
    captions = [table.column("caption")[int(i)].as_py() or "" for i in rows]
    info: dict[str, Any] = {"predict": "callable"}
    model = None
    if predict is None:
        predict, info, model = _model_predict(cfg, meta, embed_dim, folder)
    shape = getattr(model, "shape", None)  # the model's own text shape wins; else the config and token metadata
    text_len = int(getattr(shape, "text_len", cfg.prior.text_len))
    text_vocab = int(getattr(shape, "text_vocab", meta["tokenizer"]["vocab_size"]))
    token_lists = [table.column("text_tokens")[int(i)].as_py() or [] for i in rows]
    tokens = pad_text(token_lists, text_len, text_vocab).numpy().astype(np.int64)
    text, true = txt_all[rows], img_all[rows]
    scale = float(cfg.sample.guidance_scale)
    pred = np.asarray(predict(captions, tokens, text, scale), dtype=np.float32)
    uncond = np.asarray(predict(captions, tokens, text, 0.0), dtype=np.float32)  # scale 0: CFG's unconditional
    for name, m in (("prediction", pred), ("unconditional prediction", uncond)):
        if m.shape != (len(rows), embed_dim):
            raise ValueError(f"{name} has shape {m.shape}, expected {(len(rows), embed_dim)} "
                             f"({folder} holds {embed_dim}-d CLIP embeddings)")
    index = RetrievalIndex._from_arrays(keys, img_all)
    figures = evaluate_predictions(ev_keys, captions, pred, true, text, uncond, index, k=GRID_K)
    neighbours = figures.pop("neighbours")
    out = join(cfg.path("prior"), "eval")
    n = min(GRID_CAPTIONS, len(rows))
    wanted = {key for nb in neighbours[:n] for key in nb}  # the truth is drawn only when it was retrieved
    size = int((meta.get("preprocess") or {}).get("image_size") or cfg.download.image_size)
    images_folder = cfg.path("images")
    rng = np.random.default_rng(cfg.seed)  # the random-image baseline: dataset rows drawn with the run's seed
    picks = {"prior": [nb[0] for nb in neighbours], "text": [nb[0] for nb in index.search(text, 1)[0]],
             "random": [index.keys[i] for i in rng.integers(0, len(index), len(rows))]}
    images = load_images(images_folder, size, wanted | {k for p in picks.values() for k in p})
    figures["retrieved"] = score_retrievals(picks, captions, text, images, dict(zip(keys, img_all)))
    png = retrieval_grid(captions[:n], neighbours[:n], images, join(out, "retrieval.png"), truth=ev_keys[:n])
    result = {**figures, **info, "heldout_percent": percent, "heldout_rows": int(held.size),
              "heldout_bad_embeddings": int((~good).sum()), "evaluated": len(rows), "limit": limit,
              "guidance_scale": scale, "embed_dim": embed_dim, "index_skipped": index.skipped, "tokens": folder,
              "images": images_folder, "image_size": size, "missing_images": sorted(wanted - set(images)),
              "examples": [{"key": key, "caption": c, "neighbours": nb}
                           for key, c, nb in zip(ev_keys[:n], captions[:n], neighbours[:n])],
              "retrieval_png": png, "eval_json": join(out, "eval.json"), "seconds": round(time.time() - t0, 2)}
    commit.atomic_write(*commit.fs_and_path(join(out, "eval.json")), json.dumps(result, indent=1).encode())
    return result


HEADLINE = ("cos_", "recall", "text_recall", "uncond_recall", "retrieved_")


def eval_prior_summary(cfg: Any) -> dict[str, Any]:
    """``eval_prior`` on ``prior.eval_rows`` held-out rows, cut to its headline figures and where the full result
    (``eval.json``) and the retrieval grid are."""
    result = eval_prior(cfg, limit=cfg.prior.eval_rows)
    for source, sc in result["retrieved"].items():  # flat headline figures: CLIP and all four attributes per source
        result[f"retrieved_{source}_clip"] = sc["clip_to_caption"]
        if sc["pixels"].get("scored"):
            result[f"retrieved_{source}_all_match"] = sc["pixels"]["all_match"]
            result["retrieved_all_chance"] = sc["pixels"]["all_chance"]
    keep = ("beats_text_baseline", "evaluated", "index_rows", "chance_recall_at_k", "eval_json", "retrieval_png")
    return {k: v for k, v in result.items() if k.startswith(HEADLINE) or k in keep}
