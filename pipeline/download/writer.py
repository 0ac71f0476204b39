"""img2dataset's shard layout, written without importing img2dataset.

The files are those of its ``WebDatasetSampleWriter`` and ``ParquetSampleWriter`` (a test writes the same rows with
both and compares them member by member): ``{shard:05d}.tar`` with ``{key}.{jpg|png|webp}``, ``{key}.json`` (the
row's metadata, indented 4) and ``{key}.txt`` (the caption) for each kept image, in that name order, plus
``{shard:05d}.parquet`` with one metadata row per input row; or, for ``parquet`` output, only the Parquet file with
the image bytes in a column named after the encode format. Samples are written as they are handed in.

Why not img2dataset's own classes: ``img2dataset.writer`` imports webdataset, which imports torch — about two
seconds of CPU and a few hundred MB in every download worker, to write a tar file — and ``compute_key`` lives in
``img2dataset.downloader``, whose package import pulls in img2dataset's whole CLI (wandb, albumentations).
"""

from __future__ import annotations

import json
import tarfile
import time
from io import BytesIO
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import commit

SUFFIXES = {"webdataset": (".tar", ".parquet"), "parquet": (".parquet",)}


def sample_key(row: int, shard_id: int, oom_rows: int, oom_shards: int) -> str:
    """img2dataset's ``compute_key``: ``shard_id * 10**oom_rows + row``, zero-padded to oom_rows + oom_shards digits."""
    return f"{shard_id * 10 ** oom_rows + row:0{oom_rows + oom_shards}d}"


class ShardWriter:
    """One shard's files in ``folder`` (local or remote); ``write`` per row, then ``close``."""

    def __init__(self, output_format: str, folder: str, shard_id: int, schema: pa.Schema, encode_format: str):
        if output_format not in SUFFIXES:
            raise ValueError(f"unknown output format {output_format!r}")
        self.format, self.ext, self.schema = output_format, encode_format, schema
        fs, path = commit.fs_and_path(folder)
        name = f"{path}/{shard_id:05d}"
        self._rows: dict[str, list[Any]] = {k: [] for k in schema.names}
        self._tar_file = self._tar = None
        if output_format == "webdataset":
            self._tar_file = fs.open(name + ".tar", "wb")
            self._tar = tarfile.open(fileobj=self._tar_file, mode="w|")
        else:
            self.schema = schema.append(pa.field(encode_format, pa.binary()))
            self._rows[encode_format] = []
        self._parquet = (fs, name + ".parquet")

    def write(self, image: bytes | None, key: str, caption: str | None, meta: dict[str, Any]) -> None:
        if self._tar is not None and image is not None:
            now = time.time()
            members = ((self.ext, image), ("json", json.dumps(meta, indent=4).encode()),
                       ("txt", (caption if caption is not None else "").encode("utf-8")))
            for ext, data in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), now, 0o444, "bigdata", "bigdata"
                self._tar.addfile(info, BytesIO(data))
        for k in self.schema.names:
            if k == self.ext and self._tar is None:
                self._rows[k].append(image)
            else:
                self._rows[k].append(meta.get(k))

    def close(self) -> None:
        fs, path = self._parquet
        with fs.open(path, "wb") as f:
            pq.write_table(pa.Table.from_pydict(self._rows, self.schema), f)
        if self._tar is not None:
            self._tar.close()
            self._tar_file.close()
