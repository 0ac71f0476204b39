"""Near-duplicate images among the token shards, from their CLIP image embeddings (NeMo Curator's semantic dedup
idea): k-means clusters (faiss), then cosine between the members of each cluster only, never an all-pairs matrix.

    python -m pipeline dedup --config my.yaml curate.dedup_threshold=0.95

* Passes over the shards, one shard in memory at a time: (1) a seeded sample of ``curate.dedup_train_rows``
  embeddings trains spherical k-means with ``curate.dedup_clusters`` centroids (0: about sqrt(rows / 4));
  (2) every embedding is assigned its nearest centroid and spilled, float16 and sorted by cluster, to a node-local
  scratch file per shard (the scratch is never the truth); (3) per cluster, its members from every spill, in
  (shard, row) order, are compared in blocks of ``curate.dedup_max_cluster_rows``: each row's highest cosine to an
  *earlier* member; at or above ``curate.dedup_threshold`` the row is a duplicate of that member.
* Output: a side table per token shard, ``<tokens>/_dedup/{shard:05d}.parquet`` with ``key``, ``cluster``,
  ``duplicate_of`` (the earlier key, null for a row that duplicates nothing) and ``cosine`` (that highest cosine,
  null for a cluster's first row), the token shard's rows in its order; committed like the shards (Parquet first,
  marker last, under a lease). The first copy of a group keeps ``duplicate_of`` null, so a run's
  ``prior.filter: duplicate_of is null`` keeps exactly one image of each group.
* Reruns. ``_run.json`` records the settings and every token shard's footer hash: a rerun with the same ones writes
  only the side tables still missing (the passes are seeded, so it recomputes the same result); other settings or
  changed token shards are refused (dedup into a fresh folder by removing ``_dedup``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.curate.filter import DEDUP_FOLDER
from pipeline.errors import DataError, NotFoundError
from pipeline.storage import commit, schema
from pipeline.storage.lease import Lease

log = logging.getLogger(__name__)
SIDE_SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int32()), ("duplicate_of", pa.string()),
                         ("cosine", pa.float32())])


def _embeddings(fs: Any, path: str) -> tuple[list[str], np.ndarray]:
    """One committed token shard's keys and L2-normalised float32 image embeddings."""
    with fs.open(path, "rb") as f:
        pf = schema.open_token_shard(f)
        if "clip_image_emb" not in pf.schema_arrow.names:
            raise DataError(f"{path}: no clip_image_emb column; dedup compares CLIP image embeddings")
        t = pf.read(columns=["key", "clip_image_emb"])
    col = t.column("clip_image_emb").combine_chunks()
    if col.null_count:
        raise DataError(f"{path}: {col.null_count} rows without clip_image_emb")
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    bad = ~np.isfinite(norm[:, 0]) | (norm[:, 0] == 0)
    x = np.where(bad[:, None], 0.0, x / np.where(norm == 0, 1, norm)).astype(np.float32)
    return t.column("key").to_pylist(), np.ascontiguousarray(x)


def _train_kmeans(fs: Any, paths: dict[int, str], rows: dict[int, int], k: int, sample: int, seed: int) -> Any:
    total = sum(rows.values())
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(sample, total), replace=False))
    parts, start = [], 0
    for sid, path in paths.items():
        lo, hi = np.searchsorted(chosen, [start, start + rows[sid]])
        if hi > lo:
            parts.append(_embeddings(fs, path)[1][chosen[lo:hi] - start])
        start += rows[sid]
    x = np.concatenate(parts)
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, -(-len(x) // k)))
    km.train(x)
    return km


def _spill(fs: Any, paths: dict[int, str], km: Any, scratch: str) -> dict[int, list[str]]:
    """Every row's cluster; its embedding spilled by cluster into ``scratch``. Returns the keys per shard."""
    keys = {}
    for sid, path in paths.items():
        k, x = _embeddings(fs, path)
        keys[sid] = k
        _, assign = km.index.search(x, 1)
        cluster = assign[:, 0].astype(np.int32)
        order = np.argsort(cluster, kind="stable")
        np.save(os.path.join(scratch, f"{sid}.emb.npy"), x[order].astype(np.float16))
        np.save(os.path.join(scratch, f"{sid}.idx.npy"), np.stack([cluster[order], order.astype(np.int32)], 1))
    return keys


def _earlier_max(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row i of x (n, D): the highest cosine to a row j < i and that j (-1 and -inf for row 0)."""
    n = len(x)
    best, arg = np.full(n, -np.inf, np.float32), np.full(n, -1, np.int64)
    for a in range(0, n, block):
        b = min(a + block, n)
        for c in range(0, b, block):
            d = min(c + block, b)
            s = x[a:b] @ x[c:d].T  # (rows a..b) x (candidates c..d)
            rows = np.arange(a, b)[:, None]
            s[np.arange(c, d)[None, :] >= rows] = -np.inf  # only earlier rows
            j = s.argmax(1)
            v = s[np.arange(b - a), j]
            up = v > best[a:b]
            best[a:b] = np.where(up, v, best[a:b])
            arg[a:b] = np.where(up, c + j, arg[a:b])
    return best, arg


def _compare(scratch: str, keys: dict[int, list[str]], k: int, threshold: float, block: int) -> dict[int, dict]:
    """Per shard: cluster, duplicate_of, cosine of each row (in the shard's row order)."""
    out = {sid: {"cluster": np.zeros(len(v), np.int32), "dup": [None] * len(v), "cos": np.full(len(v), np.nan,
                                                                                                np.float32)}
           for sid, v in keys.items()}
    spills = {sid: (np.load(os.path.join(scratch, f"{sid}.emb.npy"), mmap_mode="r"),
                    np.load(os.path.join(scratch, f"{sid}.idx.npy"))) for sid in keys}
    bounds = {sid: np.searchsorted(idx[:, 0], np.arange(k + 1)) for sid, (_, idx) in spills.items()}
    for c in range(k):
        members, embs = [], []
        for sid, (emb, idx) in spills.items():
            lo, hi = bounds[sid][c], bounds[sid][c + 1]
            if hi > lo:
                rows = idx[lo:hi, 1]
                order = np.argsort(rows, kind="stable")  # (shard, row) order: earlier keys first
                members += [(sid, int(r)) for r in rows[order]]
                embs.append(np.asarray(emb[lo:hi], np.float32)[order])
        if not members:
            continue
        best, arg = _earlier_max(np.concatenate(embs), block)
        for i, (sid, r) in enumerate(members):
            o = out[sid]
            o["cluster"][r] = c
            if arg[i] >= 0:
                o["cos"][r] = best[i]
                if best[i] >= threshold:
                    js, jr = members[int(arg[i])]
                    o["dup"][r] = keys[js][jr]
    return out


def _settings(cfg: Config, shards: dict[int, dict]) -> dict[str, Any]:
    c = cfg.curate
    return {"threshold": c.dedup_threshold, "clusters": c.dedup_clusters, "train_rows": c.dedup_train_rows,
            "max_cluster_rows": c.dedup_max_cluster_rows, "seed": c.dedup_seed,
            "token_shards": {str(s): m.get("footer_sha256") or m.get("sha256") for s, m in shards.items()}}


def run_dedup(cfg: Config) -> dict[str, Any]:
    """The side table of every committed token shard of ``tokenize.output``, and the summary (``_summary.json``)."""
    tokens = cfg.path("tokens")
    fs, tpath = commit.fs_and_path(tokens)
    shards = commit.committed_shards(fs, tpath)
    if not shards:
        raise NotFoundError(f"{tokens}: no committed token shards to dedup")
    side = commit.join(tokens, DEDUP_FOLDER)
    sfs, spath = commit.fs_and_path(side)
    with Lease(side, "dedup") as lease:
        commit.claim_run(sfs, spath, "dedup", _settings(cfg, shards), refusal="refusing to mix side tables",
                         hint="Remove the _dedup folder to dedup again with these settings.")
        commit.clear_debris(sfs, spath)
        done = set(commit.committed_shards(sfs, spath))
        if set(shards) <= done and sfs.exists(f"{spath}/_summary.json"):
            with sfs.open(f"{spath}/_summary.json", "rb") as f:
                return dict(json.loads(f.read()), shards_written=0)
        return _dedup(cfg, fs, tpath, shards, sfs, spath, done, lease)


def _dedup(cfg: Config, fs: Any, tpath: str, shards: dict[int, dict], sfs: Any, spath: str, done: set[int],
           lease: Lease) -> dict[str, Any]:
    c = cfg.curate
    t0 = time.time()
    paths = {s: commit.shard_file(tpath, s, ".parquet", m) for s, m in shards.items()}
    for s, m in shards.items():
        schema.verify_token_shard(fs, paths[s], m)
    rows = {s: int(m["rows"]) for s, m in shards.items()}
    paths = {s: p for s, p in paths.items() if rows[s]}
    total = sum(rows.values())
    k = c.dedup_clusters or max(1, round(math.sqrt(total / 4)))
    k = min(k, max(1, total))
    scratch = tempfile.mkdtemp(prefix="dedup-")
    try:
        km = _train_kmeans(fs, paths, rows, k, c.dedup_train_rows, c.dedup_seed)
        keys = _spill(fs, paths, km, scratch)
        result = _compare(scratch, keys, k, c.dedup_threshold, c.dedup_max_cluster_rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    written = 0
    for s in shards:
        if s in done:
            continue
        lease.token.check()
        r = result.get(s) or {"cluster": np.zeros(0, np.int32), "dup": [], "cos": np.zeros(0, np.float32)}
        table = pa.table({"key": keys.get(s, []), "cluster": r["cluster"], "duplicate_of": r["dup"],
                          "cosine": pa.array(r["cos"], pa.float32(), mask=np.isnan(r["cos"]))}, schema=SIDE_SCHEMA)
        data = schema.table_bytes(table)
        commit.atomic_write(sfs, f"{spath}/{s:05d}.parquet", data)
        commit.write_marker(sfs, spath, s, {"shard_id": s, "rows": table.num_rows, "bytes": len(data),
                                            "footer_sha256": schema.footer_sha256(data),
                                            "token_shard": shards[s].get("footer_sha256") or shards[s].get("sha256")})
        written += 1
    dups = sum(sum(d is not None for d in r["dup"]) for r in result.values())
    sizes = np.bincount(np.concatenate([r["cluster"] for r in result.values()]), minlength=k) if result else [0]
    seconds = time.time() - t0
    summary = {"rows": total, "duplicates": dups, "threshold": c.dedup_threshold, "clusters": k,
               "largest_cluster": int(np.max(sizes)), "shards": len(shards), "shards_written": written,
               "seconds": round(seconds, 3), "embeddings_per_s": round(total / max(seconds, 1e-9), 1),
               "side_table": f"{cfg.path('tokens')}/{DEDUP_FOLDER}"}
    commit.atomic_write(sfs, f"{spath}/_summary.json", json.dumps(summary, indent=1).encode())
    log.info("dedup: %d near-duplicates of %d rows at cosine >= %s (%d clusters)", dups, total, c.dedup_threshold, k)
    return summary
