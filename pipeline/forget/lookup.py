"""Finding a takedown's rows: scan tasks of up to ``SCAN_BATCH`` shard ids each (a shard id: its image shard, token
shard and export partition), on the same bounded task runner as the rewrite, each reading one shard at a time and
only the columns a match needs (key, url, sha256; a marker's rejected keys), so no worker holds more than one shard
and the driver holds only the selectors and the matches.

A matched row's URL and image digests join the selectors, and the scan repeats until nothing new matches: copies of
a removed image elsewhere in the run go with it. Then, where the run has dedup side tables, one more pass finds the
tables holding a removed key or a row that copies one, and for each removed first copy of a group its earliest copy
left (shard then row order), which becomes the group's first copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.curate.filter import DEDUP_FOLDER
from pipeline.errors import RunMismatchError
from pipeline.forget import exported
from pipeline.forget.request import Selectors
from pipeline.forget.rewrite import TAKEN_DOWN, match_mask, row_digests
from pipeline.storage import commit, shards

KINDS = ("images", "tokens", "dedup", "export")
SCAN_BATCH = 16  # shard ids per scan task: a task's start costs more than scanning one shard's few columns
Parallel = Callable[[Callable[..., Any], list[Any], Callable[[Any, Any], None], Callable[[Any, str], None]], None]


@dataclass(frozen=True)
class Folders:
    images: str
    tokens: str
    dedup: str
    export: str
    takedowns: str

    @classmethod
    def of(cls, cfg: Config) -> Folders:
        tokens = cfg.path("tokens")
        return cls(cfg.path("images"), tokens, commit.join(tokens, DEDUP_FOLDER), cfg.path("clip_retrieval"),
                   cfg.path("takedowns"))

    def writable(self) -> list[str]:
        """The folders with a writer lease (those that exist)."""
        return [f for f in (self.images, self.tokens, self.dedup) if exists(f)]


def exists(folder: str) -> bool:
    fs, path = commit.fs_and_path(folder)
    return fs.exists(path)


@dataclass
class ScanJob:
    shards: list[int]
    folders: Folders
    sel: Selectors
    removed: set[str] | None = None  # set: the side-table pass, with every key the takedown removes
    kinds: tuple[str, ...] = field(default=("images", "tokens", "export"))


def _scan_file(fs: Any, path: str, columns: list[str], sel: Selectors) -> list[dict[str, Any]]:
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        t = pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])
    mask = match_mask(t, sel)
    if "code" in t.column_names:  # already taken down: nothing left to match
        mask &= [c != TAKEN_DOWN for c in t.column("code").to_pylist()]
    return row_digests(t, mask)


def scan_shards(job: ScanJob) -> list[dict[str, Any]]:
    return [scan_shard(job, sid) for sid in job.shards]


def scan_shard(job: ScanJob, sid: int) -> dict[str, Any]:
    """The matches of shard id ``sid``: kind → matched rows (key and digests); for the side-table pass, whether its
    table is affected and its (copy, removed first copy) pairs in row order."""
    f, out = job.folders, {"shard": sid, "rows": {}}
    if job.removed is not None:
        fs, path = commit.fs_and_path(f.dedup)
        marker = commit.read_marker(fs, path, sid)
        if marker is None:
            return out
        with fs.open(commit.shard_file(path, sid, ".parquet", marker), "rb") as fh:
            t = pq.read_table(fh, columns=["key", "duplicate_of"]).to_pydict()
        gone = job.removed
        out["pairs"] = [(k, d) for k, d in zip(t["key"], t["duplicate_of"]) if d in gone and k not in gone]
        out["affected"] = bool(out["pairs"]) or any(k in job.removed for k in t["key"])
        return out
    for kind in ("images", "tokens"):
        fs, path = commit.fs_and_path(getattr(f, kind))
        marker = commit.read_marker(fs, path, sid) if kind in job.kinds else None
        if marker is None:
            continue
        stem = shards.shard_stem(sid, marker["files"]) if "files" in marker else commit.shard_stem(sid, marker)
        rows = _scan_file(fs, f"{path}/{stem}.parquet", ["key", "url", "sha256", "code"], job.sel)
        rows += [{"key": k, "url_sha256": None, "sha256": None}
                 for k in sorted(set(marker.get("rejected_keys") or {}) & job.sel.keys)]
        out["rows"][kind] = rows
    if "export" in job.kinds and exists(commit.join(f.export, "metadata", exported.file_name("metadata", sid))):
        out["rows"]["export"] = exported.matched_rows(f.export, sid, job.sel)
    return out


def _ids(folders: Folders) -> list[int]:
    ids: set[int] = set()
    for folder in (folders.images, folders.tokens):
        if exists(folder):
            ids |= set(commit.committed_shards(*commit.fs_and_path(folder)))
    if exists(folders.export):
        ids |= set(exported.partitions(folders.export))
    return sorted(ids)


def _jobs(ids: list[int], folders: Folders, sel: Selectors, removed: set[str] | None = None) -> list[ScanJob]:
    return [ScanJob(ids[i:i + SCAN_BATCH], folders, sel, removed) for i in range(0, len(ids), SCAN_BATCH)]


def _run(parallel: Parallel, jobs: list[ScanJob]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    failed: dict[int, str] = {}
    parallel(scan_shards, jobs, lambda job, r: results.extend(r), lambda job, e: failed.__setitem__(job.shards[0], e))
    if failed:
        raise RunMismatchError(f"forget: the lookup failed on shards {sorted(failed)}: {'; '.join(failed.values())}")
    return sorted(results, key=lambda r: r["shard"])


def find(folders: Folders, sel: Selectors, parallel: Parallel) -> tuple[dict[str, set[int]], dict[str, str | None]]:
    """Kind → shard ids with a matching row, and the new first copy of each near-duplicate group whose first copy
    goes (None: a group left with one copy). Grows ``sel`` with the digests of the rows matched."""
    affected: dict[str, set[int]] = {k: set() for k in KINDS}
    ids, size = _ids(folders), -1
    while size != len(sel):
        size = len(sel)
        for r in _run(parallel, _jobs(ids, folders, sel)):
            for kind, rows in r["rows"].items():
                if rows:
                    affected[kind].add(r["shard"])
                for row in rows:
                    sel.keys.add(row["key"])
                    sel.url_sha256 |= {row["url_sha256"]} - {None}
                    sel.sha256 |= {row["sha256"]} - {None}
    keepers: dict[str, str | None] = {}
    if exists(folders.dedup):
        side = list(commit.committed_shards(*commit.fs_and_path(folders.dedup)))
        for r in _run(parallel, _jobs(side, folders, sel, set(sel.keys))):
            if r.get("affected"):
                affected["dedup"].add(r["shard"])
            for key, dup in r.get("pairs", []):
                keepers.setdefault(dup, key)  # shards and rows in order: the first met is the earliest
    return affected, keepers
