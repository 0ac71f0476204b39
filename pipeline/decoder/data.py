"""The decoder's data: committed image shards joined BY KEY with the token shards' CLIP image embeddings.

Order. The token shards are streamed exactly as the priors stream them (``pipeline.prior.loader.TokenLoader``: a
frozen plan, units dealt to ranks, seeded shuffle windows, resumable at any step), reading only ``key``,
``text_tokens`` (the caption, for caption conditioning) and ``clip_image_emb``. Each batch's pixels are then looked
up by key in the image shard its token shard was made from (tokenize writes token shard N from image shard N), so
the order, and therefore resume, is the token loader's, and a row can never be paired with another row's image.

Join. A token row whose key has no image (the image shard is gone, or lacks that key) is counted
(``missing_images``) and masked out of the loss like an unusable embedding: dropping it would shift every later
batch and break exact resume. At plan time rank 0 also counts, shard by shard, token keys without an image and image
keys without a token row (``DecoderPlan.join``), so a partial join is reported before training, and a join with no
row at all is refused.

Checks before any training step: a token shard without ``clip_image_emb`` (the loader, naming the file), an image
shard whose resolution is not the decoder's (the first image at plan time, every image when read, naming the shard
and key), image shards rewritten since the plan (on resume, by their markers' sha256).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.errors import DataError, NotFoundError
from pipeline.prior.loader import Batch, DataPlan, TokenLoader, check_plan, make_plan
from pipeline.storage import commit, shards

NEEDS = "the decoder is conditioned on CLIP image embeddings; re-run tokenize to add them"
_JOIN_THREADS = 16


@dataclass
class DecoderPlan:
    tokens: DataPlan
    images: str  # the image shard folder (URL) the token shards were made from
    image_shards: dict[int, dict[str, Any]]  # shard id → its marker's files record (sizes, sha256)
    image_size: int
    join: dict[str, int] = field(default_factory=dict)  # rank 0's join counts (empty on other ranks)

    @property
    def meta(self) -> dict[str, Any]:
        return self.tokens.meta

    def to_json(self) -> dict[str, Any]:
        return {**self.tokens.to_json(), "images": {"folder": self.images, "image_size": self.image_size,
                                                    "shards": {str(k): v for k, v in self.image_shards.items()},
                                                    "join": self.join}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DecoderPlan:
        img = d.get("images")
        if not isinstance(img, dict):
            raise DataError(f"{d.get('folder')}: the checkpoint's data plan has no image shards (a prior's plan?)")
        return cls(DataPlan.from_json(d), img["folder"], {int(k): v for k, v in img["shards"].items()},
                   int(img["image_size"]), dict(img.get("join") or {}))


def _image_keys(folder: str, sid: int) -> set[str]:
    """Keys of a committed image shard's successful samples, from its metadata Parquet (key + status: no image is
    read), else from the shard's samples."""
    fs, path = commit.fs_and_path(folder)
    marker = commit.read_marker(fs, path, sid) or {}
    meta = commit.shard_file(path, sid, ".parquet", marker)
    if fs.exists(commit.shard_file(path, sid, ".tar", marker)) and fs.exists(meta):
        with fs.open(meta, "rb") as f:
            t = pq.read_table(f, columns=["key", "status"])
        return {k for k, st in zip(t.column("key").to_pylist(), t.column("status").to_pylist()) if st == "success"}
    return {s["key"] for s in shards.read_shard_samples(folder, sid) if s["image"]}


def _token_keys(path: str, fs: Any) -> set[str]:
    with fs.open(path, "rb") as f:
        return set(pq.read_table(f, columns=["key"]).column("key").to_pylist())


def join_counts(plan: DataPlan, images: str, committed: dict[int, dict[str, Any]]) -> dict[str, int]:
    """Shard pair by shard pair: rows in both, token keys without an image, image keys without a token row."""
    fs, _ = commit.fs_and_path(plan.folder)

    def pair(s: dict[str, Any]) -> tuple[int, int, int]:
        tk = _token_keys(s["path"], fs)
        ik = _image_keys(images, s["shard"]) if s["shard"] in committed else set()
        return len(tk & ik), len(tk - ik), len(ik - tk)

    with ThreadPoolExecutor(min(_JOIN_THREADS, max(1, len(plan.shards)))) as pool:
        counts = list(pool.map(pair, plan.shards))
    unpaired = [sid for sid in committed if sid not in {s["shard"] for s in plan.shards}]
    extra = sum(len(_image_keys(images, sid)) for sid in unpaired)
    return {"joined": sum(c[0] for c in counts), "tokens_without_image": sum(c[1] for c in counts),
            "images_without_tokens": sum(c[2] for c in counts) + extra,
            "token_shards_without_image_shard": sum(s["shard"] not in committed for s in plan.shards),
            "image_shards_without_token_shard": len(unpaired)}


def decode_exact(data: bytes, size: int, where: str) -> np.ndarray:
    """Image bytes → (size, size, 3) uint8; an image of another resolution is refused, never resized: the decoder
    would learn from pixels its shards do not hold."""
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt bytes
        raise DataError(f"{where}: cannot decode the image ({type(exc).__name__}: {exc})") from exc
    if img.size != (size, size):
        raise DataError(f"{where}: image is {img.size[0]}x{img.size[1]}, the decoder generates {size}x{size}; "
                        f"set decoder.image_size to the shards' resolution or download at {size}")
    return np.asarray(img, dtype=np.uint8)


def _first_image(images: str, committed: dict[int, dict[str, Any]]) -> tuple[str, bytes] | None:
    for sid, manifest in committed.items():
        for s in shards.read_shard_samples(images, sid, manifest.get("files", {})):
            if s["image"]:
                return f"{images}/{sid:05d} key {s['key']}", s["image"]
    return None


def make_decoder_plan(tokens: str, images: str, unit_rows: int, image_size: int, count_join: bool,
                      filter: str = "") -> DecoderPlan:
    """Freeze the token shards (as the priors do) and the image shards they were made from; ``count_join`` (rank 0)
    also counts the join. Refuses an empty join and images of another resolution."""
    plan = make_plan(tokens, unit_rows, filter, "decoder.filter")
    committed = shards.committed_image_shards(images)
    if not committed:
        raise NotFoundError(f"{images}: no committed image shards to join with {tokens}")
    first = _first_image(images, committed)
    if first is None:
        raise NotFoundError(f"{images}: no committed image to train the decoder on")
    decode_exact(first[1], image_size, first[0])
    join = join_counts(plan, images, committed) if count_join else {}
    if count_join and not join["joined"]:
        raise DataError(f"{tokens}: no token row has an image in {images} (keys of {len(plan.shards)} token "
                        f"shard(s) found in none of the image shards); tokenize from these images first")
    files = {sid: m.get("files", {}) for sid, m in committed.items()}
    return DecoderPlan(plan, images, files, image_size, join)


def check_decoder_plan(plan: DecoderPlan) -> None:
    """On resume: the token shards as ``check_plan`` checks them, and each planned image shard still committed
    with the same files."""
    check_plan(plan.tokens)
    committed = shards.committed_image_shards(plan.images)
    for sid, files in plan.image_shards.items():
        now = (committed.get(sid) or {}).get("files")
        if now is None:
            raise DataError(f"{plan.images}/{sid:05d}: in the decoder's plan but no longer committed")
        if now != files:
            raise DataError(f"{plan.images}/{sid:05d}: rewritten since the plan was made (its marker's files "
                            "changed); resume with the images the checkpoint was trained on, or train into a new "
                            "decoder.output")


class DecoderLoader:
    """Rank ``rank``'s decoder batches: the token loader's batches, with ``image`` the joined pixels (B, 3, S, S)
    float32 in [-1, 1] and ``valid`` false where a row has no image (or an unusable embedding, or is held out)."""

    def __init__(self, plan: DecoderPlan, *, rank: int, world: int, micro_batch: int, text_len: int, seed: int,
                 shuffle_buffer: int, heldout_percent: float, cache_shards: int = 8):
        self.plan = plan
        self.tokens = TokenLoader(plan.tokens, rank=rank, world=world, micro_batch=micro_batch, text_len=text_len,
                                  seed=seed, shuffle_buffer=shuffle_buffer, embeddings=True,
                                  heldout_percent=heldout_percent, embed_columns=("clip_image_emb",), needs=NEEDS)
        self.steps_per_epoch = self.tokens.steps_per_epoch
        self.cache_shards, self.missing_images, self.shard_reads = cache_shards, 0, 0
        self._shards: OrderedDict[int, dict[str, bytes]] = OrderedDict()

    @property
    def unusable_rows(self) -> int:
        return self.tokens.unusable_rows

    def position(self, step: int) -> dict[str, Any]:
        return self.tokens.position(step)

    def _images_of(self, sid: int) -> dict[str, bytes]:
        if sid in self._shards:
            self._shards.move_to_end(sid)
            return self._shards[sid]
        files = self.plan.image_shards.get(sid)
        found = {} if files is None else {s["key"]: s["image"] for s in
                                          shards.read_shard_samples(self.plan.images, sid, files) if s["image"]}
        self.shard_reads += 1
        self._shards[sid] = found
        while len(self._shards) > self.cache_shards:
            self._shards.popitem(last=False)
        return found

    def join(self, b: Batch) -> Batch:
        """The pixels of ``b``'s keys from their image shards; rows without one are counted and masked."""
        S = self.plan.image_size
        pixels = np.zeros((len(b.keys), S, S, 3), np.uint8)
        found = np.zeros(len(b.keys), bool)
        for i, (key, sid) in enumerate(zip(b.keys, b.shards or [])):
            data = self._images_of(int(sid)).get(key)
            if data is not None:
                pixels[i] = decode_exact(data, S, f"{self.plan.images}/{int(sid):05d}.tar key {key}")
                found[i] = True
        self.missing_images += int((~found).sum())
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        valid = b.valid & torch.from_numpy(found) if b.valid is not None else torch.from_numpy(found)
        return Batch(step=b.step, keys=b.keys, text=b.text, image=x, image_emb=b.image_emb, valid=valid,
                     shards=b.shards)

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches from ``start_step`` on; the next batch's images are decoded on a thread while this one trains."""
        it = self.tokens.batches(start_step)
        pool = ThreadPoolExecutor(1, thread_name_prefix="decoder-join")
        try:
            pending = pool.submit(self.join, next(it))
            while True:
                ready = pending.result()
                pending = pool.submit(self.join, next(it))
                yield ready
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            it.close()

    def close(self) -> None:
        self.tokens.close()
