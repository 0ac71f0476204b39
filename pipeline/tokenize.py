"""Image shards → token shards: decode, then encode with the dVAE, CLIP and CLIP's BPE, then commit per shard.

Pure logic over batches; ``pipeline.ray_seam`` runs ``decode_shard`` as a Ray Data ``flat_map`` and ``Encoder`` as an
actor pool, then calls ``write_token_shard`` once a shard's rows are all encoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline import clip as clip_lib
from pipeline import commit, schema, shards
from pipeline.dvae import load_dvae


@dataclass(frozen=True)
class EncoderSpec:
    dvae_path: str
    clip_arch: str
    clip_pretrained: str
    image_size: int
    """Pixel size the dVAE encodes (the download stage's image_size)."""


def decode_shard(images_folder: str, shard_id: int, image_size: int, expected: int) -> list[dict[str, Any]]:
    """Every sample of one committed image shard as rows with a decoded (S, S, 3) uint8 image."""
    rows = []
    for s in shards.read_shard_samples(images_folder, shard_id):
        meta = s["meta"]
        rows.append({
            "shard_id": shard_id, "key": s["key"], "url": meta.get("url") or "", "caption": s["caption"],
            "sha256": meta.get("sha256") or hashlib.sha256(s["image"]).hexdigest(),
            "width": int(meta.get("original_width") or 0), "height": int(meta.get("original_height") or 0),
            "image": shards.decode_image(s["image"], image_size),
        })
    if len(rows) != expected:
        raise ValueError(f"{images_folder}/{shard_id:05d}.tar holds {len(rows)} samples but its commit marker "
                         f"records {expected} successes")
    return rows


def _file_sha256(path: str) -> str:
    fs, p = commit.fs_and_path(path)
    return commit.sha256_file(fs, p)


class Encoder:
    """dVAE codes + CLIP image/text embeddings + BPE ids for a batch of decoded rows."""

    def __init__(self, spec: EncoderSpec, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.dvae = load_dvae(spec.dvae_path)
        self.clip = clip_lib.load_clip(spec.clip_arch, spec.clip_pretrained)
        self.bpe = getattr(self.clip.tokenizer, "tokenizer", self.clip.tokenizer)
        self.grid = self.dvae.shape.grid(spec.image_size)

    def metadata(self) -> dict[str, Any]:
        return {
            "schema_version": schema.SCHEMA_VERSION, "grid": self.grid, "embed_dim": self.clip.embed_dim,
            "dvae": {"path": self.spec.dvae_path, "sha256": _file_sha256(self.spec.dvae_path),
                     "vocab_size": self.dvae.shape.vocab_size, "shape": asdict(self.dvae.shape)},
            "clip": {"arch": self.spec.clip_arch, "pretrained": self.spec.clip_pretrained,
                     "sha256": self.clip.weights_sha256},
            "tokenizer": {"id": f"open_clip:{type(self.bpe).__name__}", "vocab_size": self.text_vocab_size},
            "preprocess": {"image_size": self.spec.image_size, "dvae_input": "rgb/255",
                           "clip_input": f"bicubic to {self.clip.image_size}, CLIP mean/std"},
        }

    @property
    def text_vocab_size(self) -> int:
        return int(getattr(self.bpe, "vocab_size", 49408))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack(list(batch["image"])).astype(np.uint8)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        codes = self.dvae.encode(x).reshape(len(images), -1).numpy().astype(np.uint16)
        captions = [str(c) for c in batch["caption"]]
        img_emb = clip_lib.encode_images(self.clip, images)
        txt_emb = clip_lib.encode_texts(self.clip, captions)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["image_tokens"] = codes
        out["clip_image_emb"] = img_emb.astype(np.float16)
        out["clip_text_emb"] = txt_emb.astype(np.float16)
        out["clip_similarity"] = (img_emb * txt_emb).sum(1).astype(np.float32)
        # Ragged BPE ids travel as fixed-width rows padded with -1 (Ray Data batches want rectangular arrays).
        ids = [self.bpe.encode(c) for c in captions]
        width = max((len(i) for i in ids), default=0) or 1
        padded = np.full((len(ids), width), -1, dtype=np.int32)
        for r, toks in enumerate(ids):
            padded[r, : len(toks)] = toks
        out["text_tokens"] = padded
        return out


def write_token_shard(folder: str, shard_id: int, rows: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """Commit one token shard: Parquet first (atomically), marker last. Rows are sorted by key."""
    order = np.argsort(np.asarray(rows["key"]), kind="stable")
    sorted_rows = {k: [v[i] for i in order] if isinstance(v, list) else np.asarray(v)[order] for k, v in rows.items()}
    sorted_rows["text_tokens"] = [[int(t) for t in r if t >= 0] for r in sorted_rows["text_tokens"]]
    keys = list(sorted_rows["key"])
    if len(set(keys)) != len(keys):
        raise ValueError(f"token shard {shard_id:05d}: duplicate keys")
    meta = dict(metadata, source_shard=f"{shard_id:05d}")
    table = schema.build_table(sorted_rows, metadata["grid"], metadata["embed_dim"], meta)
    data = schema.table_bytes(table)
    fs, path = commit.fs_and_path(folder)
    fs.makedirs(path, exist_ok=True)
    commit.atomic_write(fs, f"{path}/{shard_id:05d}.parquet", data)
    manifest = {"shard_id": shard_id, "rows": len(keys), "first_key": keys[0] if keys else None,
                "last_key": keys[-1] if keys else None, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}
    commit.write_marker(fs, path, shard_id, manifest)
    return manifest
