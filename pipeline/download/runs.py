"""Run-level bookkeeping for the download stage: what committed shards say, retry-failed rounds, the run summary.

Everything here reads committed shards only (markers and their metadata Parquet), so it is safe after any crash.

retry-failed: rows that ended with a transient code (timeouts, resets, 5xx, 429, truncation) are fetched again into
*new* shards whose ids follow every existing one, so keys stay unique and committed shards are never rewritten. Each
new row records ``retry_of`` = the key it retries; a row already retried by a committed row is not retried again.
A round's plan is written before its first shard runs, so an interrupted round resumes the same plan.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.download.fetch import TRANSIENT
from pipeline.download.shard import ShardPlan
from pipeline.errors import StorageError
from pipeline.storage import commit

log = logging.getLogger(__name__)

def shard_meta(output: str, shard_id: int, columns: list[str], manifest: dict[str, Any] | None = None) -> pa.Table:
    """The per-row metadata of a committed shard (img2dataset's ``{shard}.parquet``, in the generation its marker
    ``manifest`` commits: read if not given), only ``columns``."""
    fs, out = commit.fs_and_path(output)
    if manifest is None:
        manifest = commit.read_marker(fs, out, shard_id) or {}
    with fs.open(commit.shard_file(out, shard_id, ".parquet", manifest), "rb") as f:
        return pq.read_table(f, columns=columns)


def kept_images(output: str) -> list[tuple[str, str]]:
    """(sha256, key) of every image kept by committed shards: seeds run-wide duplicate-image detection on resume."""
    fs, out = commit.fs_and_path(output)
    pairs: list[tuple[str, str]] = []
    for shard_id, manifest in commit.committed_shards(fs, out).items():
        t = shard_meta(output, shard_id, ["key", "code", "sha256"], manifest).to_pydict()
        pairs += [(s, k) for k, c, s in zip(t["key"], t["code"], t["sha256"]) if c == "ok" and s]
    return pairs


def retry_candidates(output: str, extras: list[str] | None = None) -> tuple[list[dict[str, Any]], list[pa.Field]]:
    """Rows whose last outcome was transient and that no committed row has retried yet, in key order, with their
    ``extras`` (download.save_additional_columns) and those columns' fields."""
    fs, out = commit.fs_and_path(output)
    rows, retried, fields = [], set(), {}
    for shard_id, manifest in commit.committed_shards(fs, out).items():
        t = shard_meta(output, shard_id, ["key", "url", "caption", "code", "retry_of", *(extras or [])], manifest)
        fields.update({f.name: f for f in t.schema if f.name in (extras or []) and not pa.types.is_null(f.type)})
        t = t.to_pylist()
        retried.update(r["retry_of"] for r in t if r["retry_of"])
        rows += [r for r in t if r["code"] in TRANSIENT]
    keep = [pa.field(n, fields[n].type if n in fields else pa.null()) for n in extras or []]
    return [{"url": r["url"], "caption": r["caption"], "retry_of": r["key"], **{f.name: r[f.name] for f in keep}}
            for r in sorted(rows, key=lambda r: r["key"]) if r["key"] not in retried], keep


def plan_retry_round(output: str, shard_size: int, first_free_id: int,
                     extras: list[str] | None = None) -> list[ShardPlan]:
    """The shards of the unfinished retry round, or of a new one; [] when nothing is left to retry."""
    fs, out = commit.fs_and_path(output)
    committed = set(commit.committed_shards(fs, out))
    rounds = sorted(fs.glob(f"{out}/_retry/round-*.json"))
    used = set(committed)
    for path in rounds:
        with fs.open(path, "rb") as f:
            shards = {int(k): v for k, v in json.loads(f.read())["shards"].items()}
        used |= set(shards)
        pending = [ShardPlan(s, p) for s, p in sorted(shards.items()) if s not in committed]
        if pending:
            return pending  # an interrupted round: finish exactly the plan it started with
    candidates, extra_fields = retry_candidates(output, extras)
    if not candidates:
        return []
    next_id = max([first_free_id - 1, *used]) + 1
    plan_dir = commit.join(output, "_retry", f"round-{len(rounds):03d}")  # the round's own: it outlives a run
    pfs, pdir = commit.fs_and_path(plan_dir)
    pfs.makedirs(pdir, exist_ok=True)
    plans = []
    for i in range(0, len(candidates), shard_size):
        sid = next_id + i // shard_size
        path = f"{plan_dir}/{sid}.feather"
        table = pa.Table.from_pylist(candidates[i:i + shard_size], schema=pa.schema(
            [("url", pa.string()), ("caption", pa.string()), ("retry_of", pa.string()), *extra_fields]))
        with pfs.open(f"{pdir}/{sid}.feather", "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        plans.append(ShardPlan(sid, path))
    doc = {"shards": {str(p.shard_id): p.arrow_path for p in plans}, "rows": len(candidates)}
    fs.makedirs(f"{out}/_retry", exist_ok=True)
    commit.atomic_write(fs, f"{out}/_retry/round-{len(rounds):03d}.json", json.dumps(doc, indent=1).encode())
    return plans


def summarize(output: str, failed: dict[int, str], run: dict[str, Any]) -> dict[str, Any]:
    """Totals over every committed shard plus this run's own figures; written to ``<output>/_summary.json``."""
    fs, out = commit.fs_and_path(output)
    committed = commit.committed_shards(fs, out)
    codes: Counter[str] = Counter()
    for m in committed.values():
        codes.update(m.get("codes", {}))
    count, ok = sum(codes.values()), codes.get("ok", 0)
    summary = {
        "shards_committed": len(committed), "shards_failed": {f"{k:05d}": v for k, v in sorted(failed.items())},
        "count": count, "successes": ok, "success_rate": round(ok / count, 4) if count else 0.0,
        "failed_to_download": sum(m["failed_to_download"] for m in committed.values()),
        "failed_to_resize": sum(m["failed_to_resize"] for m in committed.values()),
        "filtered": sum(m.get("filtered", 0) for m in committed.values()),
        "codes": dict(sorted(codes.items())), "errors": {k: v for k, v in sorted(codes.items()) if k != "ok"},
        "transient_rows": sum(v for k, v in codes.items() if k in TRANSIENT),  # retry-failed candidates (or retried)
        "bytes_downloaded": sum(m.get("bytes_downloaded", 0) for m in committed.values()),
        "bytes_written": sum(m.get("bytes_written", 0) for m in committed.values()),
        "this_run": run,
    }
    if run.get("shards") or failed or run.get("error") or not fs.exists(f"{out}/_summary.json"):  # no-op: as it was
        try:
            commit.atomic_write(fs, f"{out}/_summary.json", json.dumps(summary, indent=1).encode())
        except StorageError as exc:  # a full disk must not hide which shards failed: they are still returned
            log.error("download: %s", exc)
            summary["summary_not_written"] = str(exc)
    return summary
