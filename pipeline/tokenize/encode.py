"""Image shards → encoded rows: ``decode_shard`` reads and decodes one committed image shard (a CPU task), ``Encoder``
turns batches of decoded rows into dVAE codes, CLIP embeddings and BPE ids (an actor, on a GPU when it has one).

Pure logic over batches; ``pipeline.tokenize.run`` wires them into a Ray Data pipeline through the Ray seam and
``pipeline.tokenize.writer`` commits the rows of each shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.clip import model as clip_lib
from pipeline.dvae.model import load_dvae
from pipeline.runtime.devices import worker_device
from pipeline.storage import commit, schema, shards
from pipeline.tokenize.writer import SHARD_ERROR


@dataclass(frozen=True)
class EncoderSpec:
    dvae_path: str
    clip_arch: str
    clip_pretrained: str
    image_size: int
    """Pixel size the dVAE encodes (the download stage's image_size)."""




def encoder_spec(cfg: Any) -> EncoderSpec:
    """The run's encoders: its ``dvae.safetensors``, its CLIP (``clip_arch``) and the download's image size."""
    import os

    from pipeline.storage.urls import is_local, join
    from pipeline.storage.weights import DVAE_FILE

    dvae = join(cfg.path("dvae"), DVAE_FILE)  # read by every encoder actor, on any node: a URL or an absolute path
    return EncoderSpec(dvae_path=os.path.abspath(dvae) if is_local(dvae) else dvae,
                       clip_arch=clip_lib.clip_arch(cfg), clip_pretrained=cfg.clip.pretrained,
                       image_size=cfg.download.image_size)


def decode_shard(images_folder: str, shard_id: int, image_size: int, expected: int,
                 files: dict[str, Any] | None = None, extras: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every sample of one committed image shard as a row with a decoded (S, S, 3) uint8 image.

    A sample that cannot be used becomes a row with ``reject`` set (decode_error, empty_image, empty_caption,
    bad_caption) and a blank image, so processed + rejected = input exactly. A shard that cannot be read at all, or
    whose bytes differ from what its commit marker recorded, becomes one row keyed ``SHARD_ERROR`` with the reason.
    ``extras`` (the shard's additional columns) are carried from each sample's metadata into its row.
    """
    try:
        samples = shards.read_shard_samples(images_folder, shard_id, files)  # bytes checked against the marker
        if len(samples) != expected:
            raise ValueError(f"holds {len(samples)} samples but its commit marker records {expected} successes")
    except Exception as exc:  # noqa: BLE001 — a whole-shard problem is reported by name, not raised into Ray Data
        return [dict(_row(shard_id, SHARD_ERROR, {}, "", image_size, f"shard {shard_id:05d}: {exc}"),
                     **dict.fromkeys(extras))]
    return [dict(_sample_row(s, shard_id, image_size), **{c: s["meta"].get(c) for c in extras}) for s in samples]


def _sample_row(s: dict[str, Any], shard_id: int, size: int) -> dict[str, Any]:
    caption = s["caption"]
    reject = ""
    if not caption.strip():
        reject = "empty_caption"
    elif "\ufffd" in caption:
        reject = "bad_caption"
    elif not s["image"]:
        reject = "empty_image"
    row = _row(shard_id, s["key"], s["meta"], caption, size, reject)
    row["sha256"] = s["meta"].get("sha256") or hashlib.sha256(s["image"]).hexdigest()
    if not reject:
        try:
            row["image"] = shards.decode_image(s["image"], size)
        except Exception as exc:  # noqa: BLE001 — PIL raises many types for bad bytes
            row["reject"] = f"decode_error: {type(exc).__name__}"
    return row


def _row(shard_id: int, key: str, meta: dict[str, Any], caption: str, size: int, reject: str) -> dict[str, Any]:
    return {"shard_id": shard_id, "key": key, "url": meta.get("url") or "", "caption": caption, "sha256": "",
            "width": int(meta.get("original_width") or 0), "height": int(meta.get("original_height") or 0),
            "image": np.zeros((size, size, 3), np.uint8), "reject": reject}


def _file_sha256(path: str) -> str:
    fs, p = commit.fs_and_path(path)
    return commit.sha256_file(fs, p)


class Encoder:
    """dVAE codes + CLIP image/text embeddings + BPE ids for a batch of decoded rows."""

    def __init__(self, spec: EncoderSpec, threads: int = 0, gpus: float = 0.0, require_gpu: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.device = worker_device("tokenize", gpus, require_gpu)  # CUDA when Ray gave this actor a GPU
        self.dvae = load_dvae(spec.dvae_path).to(self.device)
        self.clip = clip_lib.load_clip(spec.clip_arch, spec.clip_pretrained)
        self.clip.model.to(self.device)
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
                           "clip_input": f"bicubic antialiased to {self.clip.image_size}, CLIP mean/std"},
        }

    @property
    def text_vocab_size(self) -> int:
        return int(getattr(self.bpe, "vocab_size", 49408))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack(list(batch["image"])).astype(np.uint8)
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        codes = self.dvae.encode(x).reshape(len(images), -1).cpu().numpy().astype(np.uint16)
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
