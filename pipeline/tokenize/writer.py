"""Encoded rows → committed token shards: ``ShardAssembler`` gathers the rows of each shard as batches arrive (in any
order, from any number of encoder actors, possibly twice after a retried task) and commits a shard the moment its
every row is in, encoded or rejected, through ``write_token_shard``: Parquet first, marker last.

Pure logic over numpy batches: no Ray here, so the exactly-once rules are testable on their own.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.storage import commit, schema
from pipeline.storage.faults import fault_point

log = logging.getLogger(__name__)

SHARD_ERROR = "__shard_error__"  # key of the single row a shard yields when the whole shard cannot be read


def write_token_shard(folder: str, shard_id: int, rows: dict[str, Any], metadata: dict[str, Any],
                      rejects: dict[str, str] | None = None, seconds: float = 0.0) -> dict[str, Any]:
    """Commit one token shard: Parquet first (atomically), marker last. Rows are sorted by key.

    ``rejects`` (key → reason) goes into the marker, so rows + rejects = the image shard's samples, by key.
    """
    order = np.argsort(np.asarray(rows["key"]), kind="stable")
    sorted_rows = {k: [v[i] for i in order] if isinstance(v, list) else np.asarray(v)[order] for k, v in rows.items()}
    sorted_rows["text_tokens"] = [[int(t) for t in r if t >= 0] for r in sorted_rows["text_tokens"]]
    keys = list(sorted_rows["key"])
    if len(set(keys)) != len(keys):
        raise ValueError(f"token shard {shard_id:05d}: duplicate keys")
    meta = dict(metadata, source_shard=f"{shard_id:05d}")
    table = schema.build_table(sorted_rows, metadata["grid"], metadata["embed_dim"], meta)
    data = schema.table_bytes(table)
    fs, path = commit.fs_and_path(folder)
    fs.makedirs(path, exist_ok=True)
    commit.atomic_write(fs, f"{path}/{shard_id:05d}.parquet", data)
    rejects = rejects or {}
    if set(rejects) & set(keys):
        raise ValueError(f"token shard {shard_id:05d}: keys both written and rejected")
    reasons: dict[str, int] = {}
    for reason in rejects.values():
        reasons[reason.split(":")[0]] = reasons.get(reason.split(":")[0], 0) + 1
    manifest = {"shard_id": shard_id, "rows": len(keys), "first_key": keys[0] if keys else None,
                "last_key": keys[-1] if keys else None, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "footer_sha256": schema.footer_sha256(data),
                "rejects": dict(sorted(reasons.items())),
                "rejected_keys": dict(sorted(rejects.items())), "seconds": round(seconds, 3),
                "images_per_s": round((len(keys) + len(rejects)) / seconds, 2) if seconds > 0 else None}
    fault_point("token-commit", shard_id)  # Parquet in place, marker not yet
    commit.write_marker(fs, path, shard_id, manifest)
    return manifest


def empty_rows(metadata: dict[str, Any]) -> dict[str, Any]:
    """The columns of a token shard with no rows (every URL of its image shard failed, or every row was rejected)."""
    rows: dict[str, Any] = {k: [] for k in ("key", "url", "caption", "sha256", "width", "height", "text_tokens")}
    rows["image_tokens"] = np.zeros((0, metadata["grid"] ** 2), np.uint16)
    rows["clip_image_emb"] = rows["clip_text_emb"] = np.zeros((0, metadata["embed_dim"]), np.float16)
    rows["clip_similarity"] = np.zeros(0, np.float32)
    rows.update({name: [] for name in metadata.get("extra_columns") or {}})
    return rows


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Batches of one shard's rows → one column dict (ragged text_tokens as lists)."""
    out: dict[str, Any] = {}
    for k in parts[0]:
        if k == "text_tokens":
            out[k] = [list(r) for p in parts for r in p[k]]
        else:
            out[k] = np.concatenate([p[k] for p in parts])
    out["key"] = [str(k) for k in out["key"]]
    return out


class ShardAssembler:
    """The commit loop of tokenize. ``expected`` maps each shard to its row count (its image shard's successes);
    ``add`` takes encoded batches (a ``shard_id`` column, a ``reject`` reason or '' per row) and commits each shard
    once all of its rows are in. A key delivered twice (a retried task) counts once; a shard that could not be read
    at all (one ``SHARD_ERROR`` row) is recorded in ``failed`` and never committed."""

    def __init__(self, folder: str, metadata: dict[str, Any], expected: dict[int, int],
                 on_rows: Callable[[int], None] = lambda n: None, before_commit: Callable[[], None] = lambda: None,
                 extra_columns: dict[int, dict[str, str]] | None = None):
        self.folder, self.metadata, self.expected, self.on_rows = folder, metadata, expected, on_rows
        self.extra_columns = extra_columns or {}  # shard → its image shard's additional columns {name: type}
        self.before_commit = before_commit  # e.g. the run's lease check: a superseded run commits nothing
        self.written: dict[str, Any] = {}
        self.failed: dict[str, str] = {}
        self._buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        self._rejects: dict[int, dict[str, str]] = defaultdict(dict)
        self._seen: dict[int, set[str]] = defaultdict(set)
        self._started: dict[int, float] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for s in (int(x) for x in np.unique(batch["shard_id"])):
            sel = batch["shard_id"] == s
            self._started.setdefault(s, time.time())
            self._add_part(s, {k: v[sel] for k, v in batch.items()})

    def _add_part(self, s: int, part: dict[str, np.ndarray]) -> None:
        name = f"{s:05d}"
        if SHARD_ERROR in set(part["key"]):
            self.failed[name] = str(part["reject"][list(part["key"]).index(SHARD_ERROR)])
            log.error("tokenize: %s", self.failed[name])
            self.on_rows(self.expected[s])
            return
        # A retried task (actor killed, node lost) may deliver rows twice: keep each key once.
        fresh = np.array([k not in self._seen[s] for k in part["key"]], dtype=bool)
        self._seen[s].update(str(k) for k in part["key"])
        part = {k: v[fresh] for k, v in part.items()}
        bad = part["reject"] != ""
        self._rejects[s].update({str(k): str(r) for k, r in zip(part["key"][bad], part["reject"][bad])})
        self._buffers[s].append({k: v[~bad] for k, v in part.items()})
        self.on_rows(int(fresh.sum()))
        if len(self._seen[s]) == self.expected[s] and name not in self.written:  # whole: commit, free its rows
            self.commit(s)

    def commit(self, s: int) -> None:
        parts = [p for p in self._buffers.pop(s, []) if len(p["key"])]
        meta = dict(self.metadata, extra_columns=self.extra_columns[s]) if self.extra_columns.get(s) else self.metadata
        rows = concat(parts) if parts else empty_rows(meta)
        self.before_commit()
        seconds = time.time() - self._started[s] if s in self._started else 0.0
        self.written[f"{s:05d}"] = write_token_shard(self.folder, s, rows, meta, self._rejects.pop(s, {}), seconds)

    def missing(self) -> dict[int, int]:
        """Shards neither committed nor failed, with the rows they still lack."""
        return {s: n - len(self._seen[s]) for s, n in self.expected.items()
                if f"{s:05d}" not in self.written and f"{s:05d}" not in self.failed}
