"""A clip-retrieval export partition (``img_emb_i.npy``, ``text_emb_i.npy``, ``metadata_i.parquet``) without the rows a
takedown removes. The export has no markers (its readers, embedding-reader and clip-retrieval, pair files by
position), so each file is replaced whole (``commit.atomic_write``), the embeddings first and the metadata last: the
metadata is what matches, so until it is replaced a rerun finds the partition again and finishes it (an embedding
file already cut to the kept rows is recognised by its row count, never cut twice).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.forget.request import Selectors
from pipeline.forget.rewrite import Journal, match_mask, row_digests
from pipeline.storage import commit
from pipeline.storage.faults import fault_point
from pipeline.tokenize.export import SUBFOLDERS, _npy_bytes, _parquet_bytes, file_name


def partitions(folder: str) -> list[int]:
    """Partition ids of an export folder (from its metadata files)."""
    fs, path = commit.fs_and_path(folder)
    if not fs.exists(f"{path}/metadata"):
        return []
    names = [p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/metadata/metadata_*.parquet")]
    return sorted(int(n[len("metadata_"):-len(".parquet")]) for n in names
                  if n[len("metadata_"):-len(".parquet")].isdigit())


def matched_rows(folder: str, sid: int, sel: Selectors) -> list[dict[str, Any]]:
    fs, path = commit.fs_and_path(folder)
    with fs.open(f"{path}/metadata/{file_name('metadata', sid)}", "rb") as f:
        t = pq.read_table(f, columns=["key", "url", "sha256"])
    return row_digests(t, match_mask(t, sel))


def rewrite_partition(folder: str, sid: int, sel: Selectors, journal: Journal) -> dict[str, Any] | None:
    """Partition ``sid`` of the export ``folder`` without the rows ``sel`` matches; its receipt, or None."""
    fs, path = commit.fs_and_path(folder)
    meta_path = f"{path}/metadata/{file_name('metadata', sid)}"
    if not fs.exists(meta_path):
        return None
    old_meta = fs.cat_file(meta_path)
    table = pq.read_table(io.BytesIO(old_meta))
    mask = match_mask(table, sel)
    if not mask.any():
        return journal.read("export", sid)
    n, kept = table.num_rows, table.num_rows - int(mask.sum())
    out: dict[str, bytes] = {}
    done: dict[str, str] = {}  # files a crashed attempt already replaced: their checksums as they are
    old: dict[str, Any] = {"metadata": hashlib.sha256(old_meta).hexdigest()}
    for kind in ("img_emb", "text_emb"):
        p = f"{path}/{kind}/{file_name(kind, sid)}"
        raw = fs.cat_file(p)
        matrix = np.load(io.BytesIO(raw))
        old[kind] = hashlib.sha256(raw).hexdigest()
        if len(matrix) == n:
            out[kind] = _npy_bytes(matrix[~mask])
        elif len(matrix) == kept:  # a rerun finds it cut already
            done[kind] = old[kind]
        else:  # not this partition's file
            raise DataError(f"{p}: {len(matrix)} rows, its metadata {meta_path} has {n}; refusing to rewrite it")
    out["metadata"] = _parquet_bytes(table.filter(pa.array(~mask)))
    receipt = {"takedown": journal.tid, "kind": "export", "shard": sid, "folder": fs.unstrip_protocol(path),
               "old": old, "new": {**done, **{k: hashlib.sha256(v).hexdigest() for k, v in out.items()}},
               "matched": row_digests(table, mask)}
    prev = journal.read("export", sid)
    if prev is not None:  # a rerun: the checksums before the takedown are the first attempt's
        receipt["old"] = prev["old"]
    journal.write(receipt)
    for kind in SUBFOLDERS:  # metadata last
        if kind in out:
            commit.atomic_write(fs, f"{path}/{kind}/{file_name(kind, sid)}", out[kind])
            fault_point(f"forget-export-{kind}", sid)
    return receipt
