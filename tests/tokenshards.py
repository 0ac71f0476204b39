"""Token shards written by the tokenize stage's own writer from seeded rows (no models, no Ray): for the tests of what
reads committed token shards (the clip-retrieval export, DuckDB / Hugging Face datasets / polars)."""

from __future__ import annotations

import numpy as np

from pipeline.storage import schema

D, GRID = 32, 4
# Shaped like pipeline.tokenize.encode.Encoder.metadata(); only grid, embed_dim and the SHARED_META fields matter here.
META = {
    "schema_version": schema.SCHEMA_VERSION, "grid": GRID, "embed_dim": D,
    "dvae": {"path": "dvae.safetensors", "sha256": "d" * 64, "vocab_size": 8192,
             "shape": {"vocab_size": 8192, "n_hid": 16, "group_count": 4}},
    "clip": {"arch": "ViT-B-32", "pretrained": "random.pt", "sha256": "c" * 64},
    "tokenizer": {"id": "open_clip:SimpleTokenizer", "vocab_size": 49408},
    "preprocess": {"image_size": 32, "dvae_input": "rgb/255", "clip_input": "bicubic to 224, CLIP mean/std"},
}


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def token_rows(shard_id: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    keys = [f"{shard_id:05d}{j:04d}" for j in range(n)]  # img2dataset's keys: shard id, then index in the shard
    img, txt = unit(rng, n), unit(rng, n)
    return {"key": keys[::-1], "url": [f"http://example.com/{k}.jpg" for k in keys[::-1]],
            "caption": [f"a photo number {k}" for k in keys[::-1]], "sha256": [f"{k:0>64}" for k in keys[::-1]],
            "width": rng.integers(64, 1024, n).tolist(), "height": rng.integers(64, 1024, n).tolist(),
            "text_tokens": [rng.integers(1, 49405, rng.integers(1, 12)).tolist() for _ in range(n)],
            "image_tokens": rng.integers(0, 8192, (n, GRID * GRID)), "clip_image_emb": img, "clip_text_emb": txt,
            "clip_similarity": (img.astype(np.float32) * txt.astype(np.float32)).sum(1)}
