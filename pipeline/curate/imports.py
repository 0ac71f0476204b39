"""Published CLIP embeddings → token shards: LAION's (or anyone's) ``img_emb/``, ``text_emb/``, ``metadata/`` in
embedding-reader's ``parquet_npy`` layout, as clip-retrieval's ``clip_inference`` and our ``export`` write it.

    python -m pipeline import-embeddings --config my.yaml curate.import_source=s3://bucket/laion/ \\
        curate.import_clip=ViT-L-14/openai tokenize.output=s3://bucket/laion-tokens

* Pairing. embedding-reader pairs ``img_emb_*.npy``, ``text_emb_*.npy`` and ``metadata_*.parquet`` by their position
  in each sorted folder, so one missing file shifts every later row onto the wrong caption. Here partitions are
  matched by the number in their names, every number must have all three files, and each partition's three row
  counts (npy headers, Parquet footer) and the two embedding widths must agree, all checked before anything is
  written; a mismatch names the files.
* Rows. One token shard per partition, shard id = the partition number. ``key`` comes from the metadata's ``key``
  (else ``image_path``, else partition and row); caption and URL from ``curate.import_caption_col`` /
  ``import_url_col``; ``sha256`` and the original size from img2dataset's ``sha256`` / ``original_width`` /
  ``original_height`` (else ``width`` / ``height``); the text tokens are the captions' BPE ids from the tokenizer of
  ``curate.import_clip``; ``clip_similarity`` is the two embeddings' cosine. Every other scalar metadata column
  (LAION's similarity, punsafe, pwatermark, LICENSE, ...) is kept as an additional column, so filters can use it.
* No image tokens. The shards have grid 0 and no ``image_tokens`` column: the diffusion prior trains on them, the
  autoregressive prior refuses them by name. Provenance names the source folder and the CLIP model.
* Commit. Shards are committed like tokenize's (Parquet, marker last, under the folder's lease; ``_run.json``
  records source and settings, a rerun writes only the missing shards and refuses other settings).
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.config.download import RESERVED_COLUMNS
from pipeline.errors import DataError, NotFoundError
from pipeline.storage import commit, schema
from pipeline.storage.lease import Lease
from pipeline.tokenize.writer import write_token_shard

FOLDERS = {"img_emb": "npy", "text_emb": "npy", "metadata": "parquet"}
_CONSUMED = {"key", "image_path", "sha256", "original_width", "original_height", "width", "height",
             "clip_similarity"}


def _npy_header(fs: Any, path: str) -> tuple[tuple[int, ...], np.dtype]:
    with fs.open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"npy format version {version}")
            shape, _, dtype = read[version](f)  # the header only, not the rows
        except ValueError as exc:
            raise DataError(f"{path}: not a .npy file ({exc})") from exc
    return shape, dtype


def partitions(source: str) -> dict[int, dict[str, str]]:
    """Partition number → {folder: file} for every partition of ``source``; refuses any partition missing a file,
    any file whose rows disagree with its partition's others, and embeddings of two widths."""
    fs, root = commit.fs_and_path(source)
    found: dict[str, dict[int, str]] = {}
    for sub, ext in FOLDERS.items():
        if not fs.isdir(f"{root}/{sub}"):
            raise NotFoundError(f"{source}: no {sub}/ folder (expected embedding-reader's img_emb/, text_emb/, "
                                "metadata/ layout)")
        pattern = re.compile(rf"(\d+)\.{ext}$")
        files = {}
        for p in sorted(fs.glob(f"{root}/{sub}/*.{ext}")):
            m = pattern.search(p.rsplit("/", 1)[-1])
            if m is None:
                raise DataError(f"{p}: no partition number in its name; cannot pair it with the other folders")
            if int(m.group(1)) in files:
                raise DataError(f"{p} and {files[int(m.group(1))]}: two files of partition {int(m.group(1))}")
            files[int(m.group(1))] = p
        found[sub] = files
    ids = sorted(set().union(*(set(v) for v in found.values())))
    if not ids:
        raise NotFoundError(f"{source}: no embedding partitions")
    widths: dict[int, str] = {}
    out = {}
    for i in ids:
        missing = [sub for sub in FOLDERS if i not in found[sub]]
        if missing:
            have = ", ".join(found[s][i] for s in FOLDERS if i in found[s])
            raise DataError(f"{source}: partition {i} has no {' / '.join(missing)} file (has {have}); embedding-reader "
                            "would pair every later file with the wrong rows, so nothing was imported")
        files = {sub: found[sub][i] for sub in FOLDERS}
        (n_img, *w_img), _ = _npy_header(fs, files["img_emb"])
        (n_txt, *w_txt), _ = _npy_header(fs, files["text_emb"])
        with fs.open(files["metadata"], "rb") as f:
            n_meta = pq.ParquetFile(f).metadata.num_rows
        if len(w_img) != 1 or w_img != w_txt:
            raise DataError(f"{files['img_emb']} holds rows of shape {tuple(w_img)}, {files['text_emb']} of "
                            f"{tuple(w_txt)}: image and text embeddings must be (rows, D) of one width D")
        if not n_img == n_txt == n_meta:
            raise DataError(f"partition {i}: {files['img_emb']} has {n_img} rows, {files['text_emb']} {n_txt}, "
                            f"{files['metadata']} {n_meta}; they must be the same rows")
        widths.setdefault(w_img[0], files["img_emb"])
        out[i] = files
    if len(widths) > 1:
        raise DataError("embeddings of different widths: " + "; ".join(f"{w} in {p}" for w, p in widths.items()))
    return out


def _tokenizer(arch: str) -> tuple[Any, dict[str, Any]]:
    import open_clip

    tok = open_clip.get_tokenizer(arch)
    bpe = getattr(tok, "tokenizer", tok)
    return bpe, {"id": f"open_clip:{type(bpe).__name__}", "vocab_size": int(getattr(bpe, "vocab_size", 49408))}


def _load_npy(fs: Any, path: str) -> np.ndarray:
    return np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False)


def _column(meta: pa.Table, *names: str) -> list | None:
    by_lower = {n.lower(): n for n in meta.column_names}
    for n in names:
        if n.lower() in by_lower:
            return meta.column(by_lower[n.lower()]).to_pylist()
    return None


def _extras(meta: pa.Table, c: Any) -> list[pa.Field]:
    """The metadata's other scalar columns, kept as additional columns (reserved names are consumed or left out)."""
    used = {c.import_caption_col.lower(), c.import_url_col.lower()} | _CONSUMED
    keep = []
    for f in meta.schema:
        t = f.type
        scalar = (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
                  or pa.types.is_string(t) or pa.types.is_large_string(t))
        if scalar and f.name.lower() not in used and f.name.lower() not in RESERVED_COLUMNS:
            keep.append(f)
    return keep


def _rows(fs: Any, files: dict[str, str], part: int, bpe: Any, c: Any) -> tuple[dict[str, Any], list[pa.Field]]:
    img, txt = _load_npy(fs, files["img_emb"]), _load_npy(fs, files["text_emb"])
    with fs.open(files["metadata"], "rb") as f:
        meta = pq.read_table(f)
    n = meta.num_rows
    if len(img) != n or len(txt) != n:  # the headers agreed; the bodies must too
        raise DataError(f"partition {part}: {files['img_emb']} / {files['text_emb']} hold {len(img)} / {len(txt)} "
                        f"rows, {files['metadata']} {n}")
    captions = _column(meta, c.import_caption_col)
    if captions is None:
        raise DataError(f"{files['metadata']}: no caption column '{c.import_caption_col}' (columns: "
                        f"{', '.join(meta.column_names)}; set curate.import_caption_col)")
    captions = ["" if x is None else str(x) for x in captions]
    keys = _column(meta, "key", "image_path") or [f"{part:05d}{r:09d}" for r in range(n)]
    urls = _column(meta, c.import_url_col) or [""] * n
    widths = _column(meta, "original_width", "width") or [0] * n
    heights = _column(meta, "original_height", "height") or [0] * n
    sim = _column(meta, "clip_similarity")  # our export's; else the cosine of the two embeddings
    if sim is None or any(x is None for x in sim):
        a, b = img.astype(np.float32), txt.astype(np.float32)
        sim = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    extras = _extras(meta, c)
    rows = {"key": [str(k) for k in keys], "url": ["" if u is None else str(u) for u in urls], "caption": captions,
            "sha256": [s or "" for s in (_column(meta, "sha256") or [""] * n)],
            "width": [int(w or 0) for w in widths], "height": [int(h or 0) for h in heights],
            "text_tokens": [bpe.encode(x) for x in captions], "image_tokens": np.zeros((n, 0), np.uint16),
            "clip_image_emb": img, "clip_text_emb": txt, "clip_similarity": np.asarray(sim, np.float32),
            **{f.name: meta.column(f.name).to_pylist() for f in extras}}
    return rows, extras


def _provenance(c: Any, cfg: Config, source: str, dim: int, tokenizer: dict[str, Any]) -> dict[str, Any]:
    from pipeline.clip import model as clip_lib

    named = c.import_clip or f"{clip_lib.clip_arch(cfg)}/{cfg.clip.pretrained}"
    arch, _, pretrained = named.partition("/") if not named.startswith("local-dir:") else (named, "", "")
    return {"schema_version": schema.SCHEMA_VERSION, "grid": 0, "embed_dim": dim,
            "dvae": {"none": "imported embeddings have no image tokens", "vocab_size": 0},
            "clip": {"arch": arch, "pretrained": pretrained, "sha256": None, "imported": True},
            "tokenizer": tokenizer, "preprocess": {"imported_from": source, "clip_model": named}}


def run_import(cfg: Config) -> dict[str, Any]:
    """Every partition of ``curate.import_source`` as a committed token shard in ``tokenize.output``."""
    c, tokens = cfg.curate, cfg.path("tokens")
    if not c.import_source:
        raise NotFoundError("curate.import_source is empty: name the folder holding img_emb/, text_emb/, metadata/")
    sfs, _ = commit.fs_and_path(c.import_source)
    parts = partitions(c.import_source)  # every pairing check, before any write
    dim = _npy_header(sfs, parts[min(parts)]["img_emb"])[0][1]
    from pipeline.clip import model as clip_lib

    arch = (c.import_clip.partition("/")[0] if c.import_clip and not c.import_clip.startswith("local-dir:")
            else c.import_clip or clip_lib.clip_arch(cfg))
    bpe, tokenizer = _tokenizer(arch)
    meta = _provenance(c, cfg, c.import_source, dim, tokenizer)
    fs, out = commit.fs_and_path(tokens)
    with Lease(tokens, "import-embeddings") as lease:
        commit.clear_debris(fs, out)
        commit.claim_run(fs, out, "import-embeddings", {"source": c.import_source, "provenance": meta,
                                                         "caption_col": c.import_caption_col,
                                                         "url_col": c.import_url_col,
                                                         "partitions": {str(i): p for i, p in parts.items()}})
        done = set(commit.committed_shards(fs, out))
        written, rows = 0, 0
        for i, files in parts.items():
            if i in done:
                continue
            shard_rows, extras = _rows(sfs, files, i, bpe, c)
            shard_meta = dict(meta, extra_columns={f.name: str(f.type) for f in extras}) if extras else meta
            lease.token.check()
            try:
                manifest = write_token_shard(tokens, i, shard_rows, shard_meta)
            except ValueError as exc:  # duplicate keys, a value its column cannot hold
                raise DataError(f"{files['metadata']}: {exc}") from exc
            written, rows = written + 1, rows + manifest["rows"]
    return {"partitions": len(parts), "shards_written": written, "shards_skipped": len(parts) - written,
            "rows": rows, "embed_dim": dim, "clip_model": meta["preprocess"]["clip_model"], "tokens": tokens}
