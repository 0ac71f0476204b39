"""Reading committed image shards (webdataset tars written by the download stage).

Only shards with a commit marker are read. Members are grouped by key explicitly, so a tar whose files for one key
are not contiguous still yields whole samples (Ray Data's read_webdataset can mis-group those, ray #44068).
"""

from __future__ import annotations

import hashlib
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


def _committed_bytes(fs: Any, path: str, files: dict[str, Any]) -> bytes:
    """The file's bytes, after checking them against its commit marker's size and sha256: every reader of an image
    shard (dVAE, tokenize, evaluation) hashes what it reads anyway in full, so the check costs one pass in memory."""
    data = fs.cat_file(path)
    name = path.rsplit("/", 1)[-1]
    info = files.get(name) or {}
    if "bytes" in info and len(data) != int(info["bytes"]):
        raise DataError(f"{name} changed since it was committed ({len(data)} bytes, its marker records "
                        f"{info['bytes']})")
    if "sha256" in info:
        got = hashlib.sha256(data).hexdigest()
        if got != info["sha256"]:
            raise DataError(f"{name} changed since it was committed (sha256 {got[:12]} != {info['sha256'][:12]})")
    return data


def shard_stem(shard_id: int, files: dict[str, Any]) -> str:
    """The name stem of the shard's files in the generation its marker's ``files`` record (``00003``, or
    ``00003.g1`` after a ``forget``): a reader opens what the marker names, never a fixed name."""
    for name in files:
        for suffix in (".tar", ".parquet"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
    return f"{shard_id:05d}"


def read_shard_samples(folder: str, shard_id: int, files: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every successful sample of a committed shard: key, image bytes, caption and its json metadata (tar or Parquet
    output). Its bytes are checked against the marker's record first (``files``: the marker's, read if not given)."""
    fs, path = commit.fs_and_path(folder)
    if files is None:
        files = (commit.read_marker(fs, path, shard_id) or {}).get("files", {})
    stem = shard_stem(shard_id, files)
    tar_path = f"{path}/{stem}.tar"
    if f"{stem}.tar" not in files and not fs.exists(tar_path):
        return _read_parquet_shard(fs, f"{path}/{stem}.parquet", shard_id, files)
    grouped: dict[str, dict[str, bytes]] = {}
    data = _committed_bytes(fs, tar_path, files)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
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


def _read_parquet_shard(fs: Any, pq_path: str, shard_id: int, files: dict[str, Any]) -> list[dict[str, Any]]:
    """download.output_format=parquet: one row per input row, image bytes in the encode-format column."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(_committed_bytes(fs, pq_path, files)))
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


def read_shard_metadata(folder: str, shard_id: int, files: dict[str, Any], columns: list[str]) -> Any:
    """``columns`` of a committed shard's img2dataset metadata Parquet for its successful rows, in key order (the
    order ``read_shard_samples`` lists its images in); the file's bytes checked against the marker first."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, path = commit.fs_and_path(folder)
    pq_path = f"{path}/{shard_stem(shard_id, files)}.parquet"
    wanted = list(dict.fromkeys(["key", "status", *columns]))
    table = pq.read_table(io.BytesIO(_committed_bytes(fs, pq_path, files)), columns=wanted)
    table = table.filter(pc.equal(table.column("status"), "success"))
    return table.take(pc.sort_indices(table, [("key", "ascending")])).select(columns)


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
