"""Reading committed image shards (webdataset tars written by the download stage).

Only shards with a commit marker are read. Members are grouped by key explicitly, so a tar whose files for one key
are not contiguous still yields whole samples (Ray Data's read_webdataset can mis-group those, ray #44068).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import DataError
from pipeline.storage import commit

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def committed_image_shards(folder: str) -> dict[int, dict[str, Any]]:
    fs, path = commit.fs_and_path(folder)
    return commit.committed_shards(fs, path)


def read_shard_samples(folder: str, shard_id: int) -> list[dict[str, Any]]:
    """Every successful sample of a shard: key, image bytes, caption and its json metadata (tar or Parquet output)."""
    fs, path = commit.fs_and_path(folder)
    tar_path = f"{path}/{shard_id:05d}.tar"
    if not fs.exists(tar_path):
        return _read_parquet_shard(fs, f"{path}/{shard_id:05d}.parquet", shard_id)
    grouped: dict[str, dict[str, bytes]] = {}
    with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read()), mode="r") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            data = tar.extractfile(member)
            if data is None:
                continue
            grouped.setdefault(key, {})[ext.lower()] = data.read()
    samples = []
    for key in sorted(grouped):
        parts = grouped[key]
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None:
            if "json" not in parts and "txt" not in parts:
                raise DataError(f"{tar_path}: sample '{key}' has no image member (has {sorted(parts)})")
            image = b""  # a sample whose image member is missing: tokenize rejects it as empty_image
        meta = json.loads(parts["json"]) if "json" in parts else {}
        # Undecodable caption bytes become U+FFFD, which tokenize rejects as bad_caption instead of failing the shard.
        caption = parts["txt"].decode("utf-8", "replace") if "txt" in parts else (meta.get("caption") or "")
        samples.append({"key": key, "image": image, "caption": caption, "meta": meta, "shard_id": shard_id})
    return samples


def _read_parquet_shard(fs: Any, pq_path: str, shard_id: int) -> list[dict[str, Any]]:
    """download.output_format=parquet: one row per input row, image bytes in the encode-format column."""
    import pyarrow.parquet as pq

    with fs.open(pq_path, "rb") as f:
        table = pq.read_table(f)
    col = next((e for e in IMAGE_EXTS if e in table.column_names), None)
    if col is None:
        raise DataError(f"{pq_path}: no image column (one of {IMAGE_EXTS}) in {table.column_names}")
    samples = []
    for row in table.to_pylist():
        if row[col] is None:
            continue  # a row that failed or was filtered: metadata only
        meta = {k: v for k, v in row.items() if k not in (col, "txt")}
        samples.append({"key": row["key"], "image": row[col], "caption": row.get("txt") or row.get("caption") or "",
                        "meta": meta, "shard_id": shard_id})
    return sorted(samples, key=lambda s: s["key"])


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Image bytes → (size, size, 3) uint8 RGB, centre-cropped and resized if it is not already that size."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def iter_images(folder: str, size: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """(key, caption, image) over every committed shard, in shard then key order."""
    for shard_id in committed_image_shards(folder):
        for s in read_shard_samples(folder, shard_id):
            if s["image"]:  # a sample without image bytes has nothing to train on (tokenize rejects it by name)
                yield s["key"], s["caption"], decode_image(s["image"], size)
