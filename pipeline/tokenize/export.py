"""Token shards → clip-retrieval's embedding layout, so its peers read our data unchanged.

    python -m pipeline.tokenize.export --tokens runs/demo/tokens --out runs/demo/clip_retrieval

clip-retrieval's ``clip_inference`` (``clip_inference/writer.py``, ``OutputSink``) writes, per output partition ``i``::

    <out>/img_emb/img_emb_{i}.npy         np.save of a (n, D) float16 matrix, rows L2-normalised
    <out>/text_emb/text_emb_{i}.npy       the same for the captions
    <out>/metadata/metadata_{i}.parquet   one row per embedding row, same order: image_path, caption, then the
                                          fields of the sample's img2dataset json (url, key, sha256, ...)

``embedding-reader`` (``file_format="parquet_npy"``), and through it ``autofaiss`` and ``clip-retrieval index``, pair
the ``.npy`` files with the ``.parquet`` files by position after sorting each folder's names, and ``clip-retrieval
back`` concatenates the sorted metadata files to map index ids to rows. So the only things that matter are: the three
folders hold the same partition numbers, row ``r`` of every file of partition ``i`` is the same sample, and the
names sort the same way in every folder. clip-retrieval zero-pads ``i`` to the digit count of its partition count; we
write one partition per token shard with ``i`` = the shard id padded to 5 digits like the token shards themselves
(``img_emb_00003.npy``), because a fixed width keeps names stable when ``download --retry-failed`` adds shards and makes
name order equal shard order.

Only committed token shards are read (their bytes checked against the marker's sha256); empty shards export nothing
(clip-retrieval never writes an empty partition). Each file is written whole or not at all (``commit.atomic_write``);
a rerun writes only the files that are missing, so an interrupted export is completed, never duplicated. The output
folder records the token folder and its provenance in ``_run.json`` and refuses a rerun from other tokens. Local
paths and ``s3://`` (any fsspec URL) work for both folders.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError, NotFoundError
from pipeline.storage import commit, schema

SUBFOLDERS = {"img_emb": "npy", "text_emb": "npy", "metadata": "parquet"}
METADATA_COLUMNS = ["image_path", "caption", "url", "key", "sha256", "original_width", "original_height",
                    "clip_similarity"]
_TOKEN_COLUMNS = ["key", "url", "caption", "sha256", "width", "height", "clip_image_emb", "clip_text_emb",
                  "clip_similarity"]


def file_name(kind: str, shard_id: int) -> str:
    """``img_emb`` / ``text_emb`` / ``metadata`` → its file name for one shard (``img_emb_00003.npy``)."""
    return f"{kind}_{shard_id:05d}.{SUBFOLDERS[kind]}"


def _npy_bytes(matrix: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(matrix, dtype=np.float16))
    return buf.getvalue()


def _embeddings(table: pa.Table, column: str, dim: int) -> np.ndarray:
    arr = table.column(column).combine_chunks()
    if arr.null_count:
        raise ValueError(f"{column} has {arr.null_count} null rows")
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float16, copy=False).reshape(len(arr), dim)


def _metadata_table(table: pa.Table) -> pa.Table:
    """clip-retrieval's metadata columns: image_path (its webdataset reader stores the sample key there), caption,
    then the img2dataset json fields we keep. Token shards hold the original image size, img2dataset's
    ``original_width``/``original_height``. A shard's additional columns (download.save_additional_columns: in
    img2dataset's json, so in clip-retrieval's metadata) follow under their own names and types."""
    key = table.column("key")
    return pa.table({
        "image_path": key, "caption": table.column("caption"), "url": table.column("url"), "key": key,
        "sha256": table.column("sha256"), "original_width": table.column("width"),
        "original_height": table.column("height"), "clip_similarity": table.column("clip_similarity"),
        **{name: table.column(name) for name in table.column_names if name not in _TOKEN_COLUMNS},
    })


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)  # snappy, pyarrow's (and pandas') default: every reader of these files knows it
    return buf.getvalue()


def _payload(kind: str, table: pa.Table, dim: int) -> bytes:
    if kind == "metadata":
        return _parquet_bytes(_metadata_table(table))
    return _npy_bytes(_embeddings(table, "clip_image_emb" if kind == "img_emb" else "clip_text_emb", dim))


def _existing(fs: Any, folder: str) -> dict[str, set[str]]:
    """Subfolder → names of the files already there (one listing per subfolder, cheap on object stores)."""
    out = {}
    for kind, ext in SUBFOLDERS.items():
        sub = f"{folder}/{kind}"
        out[kind] = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{sub}/*.{ext}")} if fs.exists(sub) else set()
    return out


def _check_aligned(fs: Any, folder: str) -> None:
    """Every partition must have all three files, or embedding-reader pairs npy and parquet files off by one."""
    ids: dict[str, set[str]] = {}
    for kind, names in _existing(fs, folder).items():
        pattern = re.compile(rf"^{kind}_(\d+)\.{SUBFOLDERS[kind]}$")
        foreign = sorted(n for n in names if not pattern.match(n))
        if foreign:
            raise DataError(f"{folder}/{kind} holds files that are not partitions of this export: {foreign[:5]}; "
                             f"peers would pair them with the wrong rows")
        ids[kind] = {pattern.match(n).group(1) for n in names}  # type: ignore[union-attr]
    if len({frozenset(v) for v in ids.values()}) > 1:
        diff = {k: sorted(v - ids["metadata"]) + sorted(ids["metadata"] - v) for k, v in ids.items() if k != "metadata"}
        raise DataError(f"{folder}: img_emb, text_emb and metadata hold different partitions ({diff})")


def export_clip_retrieval(tokens_folder: str, out_folder: str, index: bool = False,
                          index_memory: str = "4G") -> dict[str, Any]:
    """Export every committed token shard of ``tokens_folder`` into clip-retrieval's layout under ``out_folder``;
    with ``index``, also the autofaiss kNN indices and ``indices_paths.json`` that ``clip-retrieval back`` serves
    (``pipeline.tokenize.knn_index``), rebuilt only when this call wrote a partition or an index is missing.

    Returns ``{"shards", "rows", "out", ...}``: committed non-empty shards and their rows in the export, and what this
    call wrote or found already there.
    """
    tfs, tpath = commit.fs_and_path(tokens_folder)
    ofs, opath = commit.fs_and_path(out_folder)
    shards = commit.committed_shards(tfs, tpath)
    if not shards:
        raise NotFoundError(f"{tokens_folder}: no committed token shards")
    first = min(shards)
    provenance = {k: schema.read_metadata(tfs, commit.shard_file(tpath, first, ".parquet", shards[first])).get(k)
                  for k in schema.SHARED_META}
    commit.claim_run(ofs, opath, "export-clip-retrieval",
                     {"tokens": tfs.unstrip_protocol(tpath), "layout": "clip-retrieval img_emb/text_emb/metadata",
                      "provenance": provenance})
    for kind in SUBFOLDERS:
        ofs.makedirs(f"{opath}/{kind}", exist_ok=True)
    existing = _existing(ofs, opath)
    written, skipped, empty, rows = [], [], [], 0
    dim = int(provenance["embed_dim"])
    for shard_id, manifest in shards.items():
        if int(manifest.get("rows", 0)) == 0:
            empty.append(shard_id)
            continue
        rows += int(manifest["rows"])
        missing = [k for k in SUBFOLDERS if file_name(k, shard_id) not in existing[k]]
        if not missing:
            skipped.append(shard_id)
            continue
        src = commit.shard_file(tpath, shard_id, ".parquet", manifest)
        data = tfs.cat_file(src)
        if manifest.get("sha256") and hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            raise DataError(f"{src}: bytes do not match the sha256 in its commit marker; refusing to export it")
        pf = pq.ParquetFile(io.BytesIO(data))
        meta = json.loads((pf.schema_arrow.metadata or {}).get(schema.META_KEY, b"{}"))
        shared = {k: meta.get(k) for k in schema.SHARED_META}
        if shared != provenance:
            diff = [k for k in schema.SHARED_META if shared[k] != provenance[k]]
            raise DataError(f"{src}: metadata {diff} disagrees with shard {first:05d}; refusing to mix token shards")
        extras = [f.name for f in schema.extra_fields(meta) if f.name in pf.schema_arrow.names]
        table = pf.read(columns=_TOKEN_COLUMNS + extras)
        if table.num_rows != int(manifest["rows"]):
            raise DataError(f"{src}: {table.num_rows} rows, its commit marker records {manifest['rows']}")
        for kind in SUBFOLDERS:  # metadata last: a partition is whole once its metadata file exists
            if kind in missing:
                commit.atomic_write(ofs, f"{opath}/{kind}/{file_name(kind, shard_id)}", _payload(kind, table, dim))
        written.append(shard_id)
    _check_aligned(ofs, opath)
    result = {"shards": len(shards) - len(empty), "rows": rows, "out": out_folder, "embed_dim": dim,
              "shards_written": len(written), "shards_skipped": len(skipped), "empty_shards": empty}
    if index:
        from pipeline.tokenize import knn_index

        result["index"] = knn_index.build_indices(out_folder, index_memory, rebuild=bool(written))
        result["indices_paths"] = knn_index.write_indices_paths(out_folder, provenance["clip"] or {})
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tokenize.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", required=True, help="token shard folder (local or s3://)")
    ap.add_argument("--out", required=True, help="export folder (local or s3://)")
    ap.add_argument("--index", action="store_true", help="also build the autofaiss kNN indices and "
                    "indices_paths.json for clip-retrieval back")
    args = ap.parse_args(argv)
    print(json.dumps(export_clip_retrieval(args.tokens, args.out, index=args.index)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
