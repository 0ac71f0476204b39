"""The token shard schema (v1): one Parquet row per sample, provenance in the file's key-value metadata."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError, NotFoundError
from pipeline.storage import commit
from pipeline.storage.commit import sha256_file

SCHEMA_VERSION = "1"
META_KEY = b"pipeline.tokens"
ROW_GROUP_ROWS = 1024
# Metadata fields that must agree across shards read together (source shard and row counts may differ).
SHARED_META = ("schema_version", "grid", "embed_dim", "dvae", "clip", "tokenizer", "preprocess")


def token_schema(grid: int, embed_dim: int, metadata: dict[str, Any] | None = None) -> pa.Schema:
    """The v1 columns, then the shard's additional ones. ``grid`` 0: a shard without image tokens (made from
    published embeddings by ``import-embeddings``), which has no ``image_tokens`` column."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("text_tokens", pa.list_(pa.uint16())),
        *([pa.field("image_tokens", pa.list_(pa.uint16(), grid * grid))] if grid else []),  # grid 0: imported
        pa.field("clip_image_emb", pa.list_(pa.float16(), embed_dim)),
        pa.field("clip_text_emb", pa.list_(pa.float16(), embed_dim)),
        pa.field("clip_similarity", pa.float32()),
    ]
    fields += extra_fields(metadata or {})
    meta = {META_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata is not None else None
    return pa.schema(fields, metadata=meta)


def extra_fields(metadata: dict[str, Any]) -> list[pa.Field]:
    """The shard's additional columns (download.save_additional_columns, an import's metadata columns), nullable,
    after the v1 columns, as its metadata's ``extra_columns`` ({name: arrow type name}) records them."""
    try:
        return [pa.field(name, pa.type_for_alias(t)) for name, t in (metadata.get("extra_columns") or {}).items()]
    except ValueError as exc:
        raise DataError(f"extra_columns {metadata.get('extra_columns')}: {exc}") from exc


def _fixed(values: np.ndarray, dtype: pa.DataType, width: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def build_table(rows: dict[str, Any], grid: int, embed_dim: int, metadata: dict[str, Any]) -> pa.Table:
    """Column batch → table. ``image_tokens`` (n, grid²) and embeddings (n, D) are numpy arrays."""
    n = len(rows["key"])
    image_tokens = np.asarray(rows["image_tokens"]) if grid else np.zeros((n, 0), np.uint16)
    if image_tokens.shape != (n, grid * grid):
        raise ValueError(f"image_tokens has shape {image_tokens.shape}, expected {(n, grid * grid)}")
    if image_tokens.size and (image_tokens.min() < 0 or image_tokens.max() > 65535):
        raise ValueError("image_tokens out of uint16 range")
    img_emb = np.asarray(rows["clip_image_emb"], dtype=np.float16)
    txt_emb = np.asarray(rows["clip_text_emb"], dtype=np.float16)
    schema = token_schema(grid, embed_dim, metadata)
    arrays = [
        pa.array(rows["key"], pa.string()), pa.array(rows["url"], pa.string()), pa.array(rows["caption"], pa.string()),
        pa.array(rows["sha256"], pa.string()), pa.array(rows["width"], pa.int32()),
        pa.array(rows["height"], pa.int32()),
        pa.array([list(map(int, t)) for t in rows["text_tokens"]], pa.list_(pa.uint16())),
        *([_fixed(image_tokens.astype(np.uint16), pa.uint16(), grid * grid)] if grid else []),
        _fixed(img_emb, pa.float16(), embed_dim), _fixed(txt_emb, pa.float16(), embed_dim),
        pa.array(np.asarray(rows["clip_similarity"], dtype=np.float32), pa.float32()),
    ]
    for f in schema.names[len(arrays):]:
        values = rows[f]
        arrays.append(pa.array(values.tolist() if isinstance(values, np.ndarray) else list(values),
                               schema.field(f).type))
    return pa.Table.from_arrays(arrays, schema=schema)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Row groups of ~1k rows: the prior's loader deals row groups to ranks and reads one per unit, so one big
    # group per shard would make every rank read (and, on S3, fetch) the whole shard for each slice it owns.
    # Page checksums (CRC32 per data page): readers verify every page they decode, for free next to the decode.
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS, write_page_checksum=True)
    return buf.getvalue()


def footer_sha256(data_tail: bytes) -> str:
    """sha256 of a Parquet file's footer (its metadata: schema, row groups, offsets, statistics), from the file's
    last bytes (at least footer + 8). Any rewrite of the rows changes it."""
    length = int.from_bytes(data_tail[-8:-4], "little")
    if data_tail[-4:] != b"PAR1" or length + 8 > len(data_tail):
        raise DataError("not a Parquet file (no PAR1 footer)")
    return hashlib.sha256(data_tail[-8 - length:-8]).hexdigest()


def read_footer(fs: Any, path: str) -> tuple[int, str]:
    """(file size, footer sha256) of a Parquet file, reading only its tail."""
    with fs.open(path, "rb") as f:
        size = f.size if hasattr(f, "size") else fs.size(path)
        f.seek(max(0, size - 8))
        length = int.from_bytes(f.read(8)[:4], "little")
        f.seek(max(0, size - 8 - length))
        return size, footer_sha256(f.read())


def verify_token_shard(fs: Any, path: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Check a committed token shard against its marker before it is read: its size always, and its footer's
    sha256 (cheap: the footer is read anyway) where the marker records one; older markers without it get the whole
    file's sha256 (one full read). The data pages are then checked by their CRC as they are read
    (``open_token_shard``). Returns what the plan records: size and footer hash."""
    size, footer = read_footer(fs, path)
    if manifest.get("bytes") is not None and size != int(manifest["bytes"]):
        raise DataError(f"{path}: {size} bytes, its commit marker records {manifest['bytes']}: the shard was "
                        "rewritten or truncated after its commit; refusing to read it")
    if manifest.get("footer_sha256"):
        if footer != manifest["footer_sha256"]:
            raise DataError(f"{path}: its Parquet footer (row groups, row counts) differs from what its commit "
                            "marker recorded: the shard was rewritten after its commit; refusing to read it")
    elif manifest.get("sha256"):
        got = sha256_file(fs, path)
        if got != manifest["sha256"]:
            raise DataError(f"{path}: sha256 {got[:12]} differs from its commit marker's {manifest['sha256'][:12]}: "
                            "the shard changed after its commit; refusing to read it")
    return {"bytes": size, "footer_sha256": footer}


def open_token_shard(f: Any, metadata: Any = None) -> pq.ParquetFile:
    """A token shard opened so that every data page read is checked against its CRC (shards written before page
    checksums simply have none to check)."""
    return pq.ParquetFile(f, metadata=metadata, page_checksum_verification=True)


def read_metadata(fs, path: str) -> dict[str, Any]:
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    if META_KEY not in meta:
        raise DataError(f"{path}: not a token shard (no {META_KEY.decode()} metadata)")
    return json.loads(meta[META_KEY])


def read_token_shards(folder: str, columns: list[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Every committed token shard of ``folder`` as one table, each checked against its marker first; refuses shards
    whose provenance disagrees."""
    fs, path = commit.fs_and_path(folder)
    shards = commit.committed_shards(fs, path)
    if not shards:
        raise NotFoundError(f"{folder}: no committed token shards")
    tables, first = [], None
    for shard_id, manifest in shards.items():
        p = commit.shard_file(path, shard_id, ".parquet", manifest)
        verify_token_shard(fs, p, manifest)
        meta = read_metadata(fs, p)
        shared = {k: meta.get(k) for k in SHARED_META}
        if first is None:
            first = (p, shared)
        elif shared != first[1]:
            diff = [k for k in SHARED_META if shared[k] != first[1][k]]
            raise DataError(f"{p}: metadata {diff} disagrees with {first[0]}; refusing to mix token shards")
        with fs.open(p, "rb") as f:
            try:
                tables.append(open_token_shard(f).read(columns=columns))
            except (OSError, pa.ArrowException) as exc:  # a page whose CRC fails, or a torn file
                raise DataError(f"{p}: unreadable although committed ({exc})") from exc
    assert first is not None
    return pa.concat_tables(tables), first[1]
