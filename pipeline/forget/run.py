"""``forget`` as a run: a takedown list → every matching row found in the run's image shards, token shards, side
tables and clip-retrieval export → each affected shard id rewritten by one task (``forget_shard``: images, then
tokens, then the side table that names the token shard, then the export partition), bounded in flight → the record.

Under the writer leases of the image, token and side-table folders (a download, tokenize or dedup running into the
run makes ``forget`` refuse, and one started meanwhile refuses), after checking that no shard of the run is left
half-committed. The lookup (``pipeline.forget.lookup``) scans a shard id per task as well, only the columns a match
needs; the selectors are a set.
Stage logic only: ``parallel`` is the seam's bounded task runner on a cluster, a plain loop in-process.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.errors import RunMismatchError
from pipeline.forget import exported, record
from pipeline.forget.lookup import Folders, Parallel, exists, find
from pipeline.forget.request import Selectors, read_request
from pipeline.forget.rewrite import Journal, rewrite_image_shard, rewrite_side_table, rewrite_token_shard
from pipeline.storage import commit
from pipeline.storage.faults import fault_point
from pipeline.storage.lease import Lease, LeaseToken

log = logging.getLogger(__name__)
_DATA = re.compile(r"^(\d{5})(?:\.g\d+)?(?:\.tar|\.parquet)$")


@dataclass
class ShardJob:
    shard: int
    tid: str
    folders: Folders
    sel: Selectors
    keepers: dict[str, str | None]
    leases: tuple[LeaseToken, ...] = ()


def in_process(fn: Callable[..., Any], items: list[Any], done: Callable[[Any, Any], None],
               failed: Callable[[Any, str], None]) -> None:
    for item in items:
        done(item, fn(item))


def check_committed(folder: str) -> None:
    """Refuse a folder holding a shard's data files without its marker (a stage died between them)."""
    if not exists(folder):
        return
    fs, path = commit.fs_and_path(folder)
    committed = commit.committed_shards(fs, path)
    loose = sorted({int(m.group(1)) for p in fs.ls(path, detail=False)
                    if (m := _DATA.match(p.rsplit("/", 1)[-1])) and int(m.group(1)) not in committed})
    staged = fs.exists(f"{path}/_staging") and bool(fs.ls(f"{path}/_staging", detail=False))
    if loose or staged:
        what = f"shards {', '.join(f'{s:05d}' for s in loose[:5])} have files but no commit marker" if loose \
            else "_staging holds a shard being written"
        raise RunMismatchError(f"{folder}: {what}; finish or repair the run first (rerun the stage that writes "
                               "there: it redoes uncommitted shards), then forget")


@contextlib.contextmanager
def _leases(folders: Folders) -> Iterator[tuple[LeaseToken, ...]]:
    with contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(Lease(f, "forget")).token for f in folders.writable())


def forget_shard(job: ShardJob) -> list[dict[str, Any]]:
    """Every artefact of one shard id without the job's rows: the receipts of those rewritten."""
    f, sid = job.folders, job.shard
    journal = Journal(f.takedowns, job.tid)

    def check() -> None:
        for token in job.leases:
            token.check()

    sel = Selectors(set(job.sel.keys), set(job.sel.url_sha256), set(job.sel.sha256))
    out = []
    for kind, fn in (("images", rewrite_image_shard), ("tokens", rewrite_token_shard)):
        folder = getattr(f, kind)
        if exists(folder) and (r := fn(folder, sid, sel, journal, check)) is not None:
            sel.keys |= {row["key"] for row in r["matched"]}
            out.append(r)
    if exists(f.dedup):
        tfs, tpath = commit.fs_and_path(f.tokens)
        token = commit.read_marker(tfs, tpath, sid)
        if (r := rewrite_side_table(f.dedup, sid, sel.keys, job.keepers, token, journal, check)) is not None:
            out.append(r)
    if exists(f.export) and (r := exported.rewrite_partition(f.export, sid, sel, journal)) is not None:
        out.append(r)
    return out


def _refresh_dedup_run(folders: Folders) -> None:
    """The side tables' run record names every token shard's footer: renamed to the new generations'."""
    if not exists(folders.dedup):
        return
    fs, path = commit.fs_and_path(folders.dedup)
    if not fs.exists(f"{path}/_run.json"):
        return
    doc = json_load(fs, f"{path}/_run.json")
    settings = doc.get("settings", {})
    tfs, tpath = commit.fs_and_path(folders.tokens)
    now = {str(s): m.get("footer_sha256") or m.get("sha256") for s, m in commit.committed_shards(tfs, tpath).items()}
    if settings.get("token_shards") != now and "token_shards" in settings:
        commit.claim_run(fs, path, doc["stage"], dict(settings, token_shards=now), replace=True)


def json_load(fs: Any, path: str) -> Any:
    import json

    return json.loads(fs.cat_file(path))


def carry_out(folders: Folders, tid: str, parallel: Parallel, leases: tuple[LeaseToken, ...],
              report: Callable[[set[str], list[dict[str, Any]]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Takedown ``tid`` (already requested) carried out to its record: every affected shard rewritten (those a
    previous attempt switched are only tidied), the side tables' run record renewed, then the record written."""
    t0 = time.time()
    sel = record.selectors_of(folders.takedowns, tid)
    affected, keepers = find(folders, sel, parallel)
    t_find = time.time() - t0
    done_before = {r["shard"] for r in Journal(folders.takedowns, tid).all()}
    ids = sorted(set().union(*affected.values()) | done_before)
    log.info("forget %s: %d shard ids to rewrite (%s)", tid, len(ids),
             ", ".join(f"{k} {len(v)}" for k, v in affected.items()))
    failed: dict[str, str] = {}
    seconds: list[float] = []

    def done(job: ShardJob, result: dict[str, Any]) -> None:
        seconds.append(result["seconds"])

    def gave_up(job: ShardJob, error: str) -> None:
        failed[f"{job.shard:05d}"] = error

    jobs = [ShardJob(s, tid, folders, sel, keepers, leases) for s in ids]
    parallel(timed_shard, jobs, done, gave_up)
    if failed:
        raise RunMismatchError(f"forget {tid}: shards {sorted(failed)} failed ({'; '.join(failed.values())}); "
                               "nothing of them is lost (each is whole in its old or new generation): rerun forget")
    _refresh_dedup_run(folders)
    receipts = Journal(folders.takedowns, tid).all()
    removed = {row["key"] for r in receipts for row in r["matched"]}
    doc = dict(record.request(folders.takedowns, tid), finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               receipts=receipts, keys_removed=sorted(removed), rows_removed=len(removed),
               rewritten={k: sorted({r["shard"] for r in receipts if r["kind"] == k})
                          for k in ("images", "tokens", "dedup", "export")},
               refuse=sel.to_json(), seconds=round(time.time() - t0, 3), find_seconds=round(t_find, 3),
               shard_tasks=len(seconds),
               seconds_per_shard=round(sum(seconds) / len(seconds), 4) if seconds else 0.0)
    doc["shards_rewritten"] = sum(len(v) for v in doc["rewritten"].values())
    doc["models"] = report(removed, receipts) if report else {}
    fault_point("forget-record", 0)  # every shard switched, the record not yet written
    record.finish(folders.takedowns, tid, doc)
    return doc


def timed_shard(job: ShardJob) -> dict[str, Any]:
    t0 = time.time()
    receipts = forget_shard(job)
    return {"shard": job.shard, "receipts": len(receipts), "seconds": time.time() - t0}


def run_forget(cfg: Config, files: dict[str, str], parallel: Parallel = in_process) -> dict[str, Any]:
    """``forget --keys/--urls/--sha256 FILE``: the list read and checked whole first, then under the run's writer
    leases every unfinished takedown finished and this one carried out; the summary (the record, shortened)."""
    from pipeline.forget.exposure import models_report

    sel, asked = read_request(files)  # a malformed line stops here, before any lease or write
    folders = Folders.of(cfg)
    with _leases(folders) as leases:
        for folder in (folders.images, folders.tokens, folders.dedup):
            check_committed(folder)
        report = lambda removed, receipts: models_report(cfg, removed, receipts)  # noqa: E731
        finished = []
        todo = record.pending(folders.takedowns)
        same = [t for t in todo if record.request(folders.takedowns, t)["fingerprint"] == sel.fingerprint()]
        if not same:
            todo.append(record.start(folders.takedowns, sel, asked))
        for tid in todo:
            finished.append(carry_out(folders, tid, parallel, leases, report))
    last = finished[-1]
    summary = {k: last[k] for k in ("takedown", "rows_removed", "shards_rewritten", "rewritten", "seconds",
                                    "find_seconds", "shard_tasks", "seconds_per_shard", "models")}
    summary["record"] = commit.join(folders.takedowns, f"{last['takedown']}.json")
    summary["finished_earlier_takedowns"] = [d["takedown"] for d in finished[:-1]]
    if not last["rows_removed"]:
        summary["note"] = "the list matched no row of the run; nothing was rewritten (later downloads refuse it)"
    return summary
