"""A small committed run for the forget tests, written through the stages' own writers: image shards (img2dataset's
layout, ``commit_staged``), token shards (``write_token_shard``), dedup side tables and a clip-retrieval export."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa

from pipeline.config import Config, load_config
from pipeline.curate.dedup import SIDE_SCHEMA
from pipeline.download.shard import META_SCHEMA, commit_staged
from pipeline.download.writer import ShardWriter
from pipeline.storage import commit, schema
from pipeline.tokenize.export import export_clip_retrieval
from pipeline.tokenize.writer import write_token_shard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
D, GRID = 8, 2
META = {"schema_version": "1", "grid": GRID, "embed_dim": D, "dvae": {"id": "t", "sha256": "0", "vocab_size": 64},
        "clip": {"arch": "t", "pretrained": "", "sha256": "0"}, "tokenizer": {"id": "bpe", "vocab_size": 1000},
        "preprocess": {"image_size": 8}}


def url(sid: int, i: int) -> str:
    return f"http://img.example/{sid}/{i}.png"


def image_bytes(sid: int, i: int) -> bytes:
    return f"png-{sid}-{i}".encode() * 4  # readers of the image shard here never decode it


def sha(sid: int, i: int) -> str:
    return hashlib.sha256(image_bytes(sid, i)).hexdigest()


def key(sid: int, i: int) -> str:
    return f"{sid:05d}{i:02d}"


def _image_shard(images: str, sid: int, n: int, failed: set[int], fmt: str = "webdataset") -> None:
    staging = f"{images}/_staging/{sid:05d}"
    fs, stage = commit.fs_and_path(staging)
    fs.makedirs(stage, exist_ok=True)
    writer = ShardWriter(fmt, staging, sid, META_SCHEMA, "png")
    codes = []
    for i in range(n):
        ok = i not in failed
        meta = {name: None for name in META_SCHEMA.names}
        meta.update(key=key(sid, i), url=url(sid, i), caption=f"caption {sid} {i}", status="success" if ok else
                    "failed_to_download", code="ok" if ok else "timeout", sha256=sha(sid, i) if ok else None)
        writer.write(image_bytes(sid, i) if ok else None, key(sid, i), f"caption {sid} {i}", meta)
        codes.append(meta["code"])
    writer.close()
    counts = {c: codes.count(c) for c in sorted(set(codes))}
    ok = counts.get("ok", 0)
    stats = {"shard_id": sid, "count": n, "successes": ok, "failed_to_download": n - ok,
             "failed_to_resize": 0, "filtered": 0, "codes": counts, "bytes_downloaded": 0, "bytes_written": 0,
             "start_time": 0.0, "end_time": 0.0, "attempt": 0}
    with fs.open(f"{stage}/{sid:05d}_stats.json", "wb") as f:
        f.write(json.dumps(stats).encode())
    commit_staged(images, staging, sid, fmt, stats)


def token_rows(sid: int, keys: list[int]) -> dict:
    rng = np.random.default_rng(sid)
    n = len(keys)
    emb = rng.standard_normal((n, D)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    return {"key": [key(sid, i) for i in keys], "url": [url(sid, i) for i in keys],
            "caption": [f"caption {sid} {i}" for i in keys], "sha256": [sha(sid, i) for i in keys],
            "width": [8] * n, "height": [8] * n, "text_tokens": [[1, 2, 3]] * n,
            "image_tokens": rng.integers(0, 64, (n, GRID * GRID)), "clip_image_emb": emb, "clip_text_emb": emb,
            "clip_similarity": np.ones(n, np.float32)}


def _side_table(tokens: str, sid: int, keys: list[str], dup: dict[str, str]) -> None:
    side = commit.join(tokens, "_dedup")
    fs, path = commit.fs_and_path(side)
    fs.makedirs(path, exist_ok=True)
    table = pa.table({"key": keys, "cluster": [0] * len(keys), "duplicate_of": [dup.get(k) for k in keys],
                      "cosine": [0.99 if k in dup else None for k in keys]}, schema=SIDE_SCHEMA)
    data = schema.table_bytes(table)
    commit.atomic_write(fs, f"{path}/{sid:05d}.parquet", data)
    tfs, tpath = commit.fs_and_path(tokens)
    token = commit.read_marker(tfs, tpath, sid) or {}
    commit.write_marker(fs, path, sid, {"shard_id": sid, "rows": len(keys), "bytes": len(data),
                                        "footer_sha256": schema.footer_sha256(data),
                                        "token_shard": token.get("footer_sha256")})


def make_run(root: str, shards: int = 3, rows: int = 8, export: bool = True, dedup: bool = True,
             extra: list[str] | None = None, image_format: str = "webdataset") -> Config:
    """``shards`` image shards of ``rows`` rows (row 7 of each failed with a timeout), their token shards (row 6
    rejected by tokenize), side tables (row 1 a copy of row 0) and the export."""
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [f"run_dir={root}", *(extra or [])])
    images, tokens = cfg.path("images"), cfg.path("tokens")
    for sid in range(shards):
        _image_shard(images, sid, rows, failed={rows - 1}, fmt=image_format)
        kept = list(range(rows - 2))
        write_token_shard(tokens, sid, token_rows(sid, kept), META, rejects={key(sid, rows - 2): "decode_error: x"})
        if dedup:
            keys = [key(sid, i) for i in kept]
            _side_table(tokens, sid, keys, {key(sid, 1): key(sid, 0), key(sid, 2): key(sid, 0)})
    if dedup:
        fs, path = commit.fs_and_path(commit.join(tokens, "_dedup"))
        tfs, tpath = commit.fs_and_path(tokens)
        commit.claim_run(fs, path, "dedup", {"threshold": 0.95, "token_shards": {
            str(s): m["footer_sha256"] for s, m in commit.committed_shards(tfs, tpath).items()}})
    if export:
        export_clip_retrieval(tokens, cfg.path("clip_retrieval"))
    return cfg


def checksums(*folders: str) -> dict[str, str]:
    """Every file under ``folders`` (but leases and the takedown record) → its sha256."""
    out = {}
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            if "_lease" in dirpath:
                continue
            for name in files:
                p = os.path.join(dirpath, name)
                out[os.path.relpath(p, folder) + "@" + folder] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
