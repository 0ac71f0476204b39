"""One committed shard written anew without the rows a takedown removes, as its next generation.

Each ``rewrite_*`` reads the shard's committed generation (checked against its marker), writes the next generation's
files under their own names (``00003.g1.tar``...), records a receipt in the takedown's journal (old and new
checksums, the rows matched), then switches the marker (``commit.switch_generation``: the one atomic step) and
removes the old generation's files. A rerun after a crash anywhere finds either the old generation still committed
(and redoes the shard from it: new files are overwritten) or the new one (and only finishes removing old files).

Image shards keep one metadata row per input row (keys stay stable, the row counts of the download stay whole): a
removed row keeps only its key, with code ``taken_down``; its image, caption, URL and hashes are gone. Token shards
and side tables lose the row. Pure storage logic: no Ray here (``pipeline.forget.run`` distributes shards).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.download.fetch import FETCH_CODES
from pipeline.download.imaging import IMAGE_CODES
from pipeline.forget.request import Selectors, url_digest
from pipeline.storage import commit, schema, shards
from pipeline.storage.faults import fault_point

TAKEN_DOWN = "taken_down"
KEEP_ON_TAKEDOWN = ("key", "status", "code", "error_message")  # what an image shard keeps of a removed row
Check = Callable[[], None]


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def match_mask(table: pa.Table, sel: Selectors) -> np.ndarray:
    cols = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in ("key", "url", "sha256")}
    return np.fromiter((sel.matches(k, u, s) for k, u, s in zip(cols["key"], cols["url"], cols["sha256"])),
                       bool, table.num_rows)


def row_digests(table: pa.Table, mask: np.ndarray) -> list[dict[str, Any]]:
    """What the record keeps of each matched row: its key and the digests a download refuses by."""
    rows = table.filter(pa.array(mask)).select([c for c in ("key", "url", "sha256") if c in table.column_names])
    return [{"key": r["key"], "url_sha256": url_digest(r["url"]) if r.get("url") else None,
             "sha256": r.get("sha256"), "row": int(i)} for r, i in zip(rows.to_pylist(), np.flatnonzero(mask))]


class Journal:
    """The receipts of one takedown: ``<takedowns>/<id>/<kind>-<shard>.json``, one per shard it rewrites."""

    def __init__(self, folder: str, tid: str):
        self.fs, self.path = commit.fs_and_path(commit.join(folder, tid))
        self.tid = tid

    def _name(self, kind: str, sid: int) -> str:
        return f"{self.path}/{kind}-{sid:05d}.json"

    def read(self, kind: str, sid: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self._name(kind, sid)))
        except FileNotFoundError:
            return None

    def write(self, receipt: dict[str, Any]) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
        commit.atomic_write(self.fs, self._name(receipt["kind"], receipt["shard"]),
                            json.dumps(receipt, indent=1, sort_keys=True).encode())

    def all(self) -> list[dict[str, Any]]:
        if not self.fs.exists(self.path):
            return []
        return [json.loads(self.fs.cat_file(p)) for p in sorted(self.fs.glob(f"{self.path}/*-*.json"))]


def _finished(journal: Journal, kind: str, fs: Any, path: str, sid: int,
              marker: dict[str, Any]) -> dict[str, Any] | None:
    """This takedown's receipt for the shard when its switch already happened (a rerun): old files removed."""
    receipt = journal.read(kind, sid)
    if receipt is None or int(marker.get("generation") or 0) != receipt["new_generation"]:
        return None
    commit.remove_stale_generations(fs, path, sid, marker)
    return receipt


def _commit(journal: Journal, kind: str, fs: Any, path: str, sid: int, old: dict[str, Any], new: dict[str, Any],
            files: dict[str, bytes], matched: list[dict[str, Any]], check: Check) -> dict[str, Any]:
    """New files, then the receipt, then the switch (each step a crash point of its own)."""
    for name, data in files.items():
        commit.atomic_write(fs, f"{path}/{name}", data)
    fault_point("forget-files", sid)
    receipt = {"takedown": journal.tid, "kind": kind, "shard": sid, "folder": fs.unstrip_protocol(path),
               "old_generation": int(old.get("generation") or 0), "new_generation": int(new["generation"]),
               "old": _checksums(old), "new": _checksums(new), "matched": matched}
    journal.write(receipt)
    fault_point("forget-receipt", sid)
    commit.switch_generation(fs, path, sid, old, new, before_switch=check)
    return receipt


def _checksums(marker: dict[str, Any]) -> dict[str, Any]:
    if "files" in marker:
        return {n: f.get("sha256") for n, f in sorted(marker["files"].items())}
    return {"bytes": marker.get("bytes"), "sha256": marker.get("sha256"), "footer_sha256": marker.get("footer_sha256")}


def _next(marker: dict[str, Any], tid: str) -> dict[str, Any]:
    return dict(marker, generation=int(marker.get("generation") or 0) + 1,
                takedowns=[*marker.get("takedowns", []), tid])


# ---- image shards ------------------------------------------------------------------------------------------------


def _status(code: str) -> str:
    return ("success" if code == "ok" else "failed_to_download" if code in FETCH_CODES
            else "failed_to_resize" if code in IMAGE_CODES else "filtered")


def _mark_rows(table: pa.Table, mask: np.ndarray, tid: str) -> pa.Table:
    """Matched rows keep their key only, with code taken_down; every other column of theirs becomes null."""
    cols = []
    keep = pa.array(~mask)
    for name in table.column_names:
        col = table.column(name)
        if name == "code":
            col = pc.if_else(keep, col, pa.scalar(TAKEN_DOWN, col.type))
        elif name == "status":
            col = pc.if_else(keep, col, pa.scalar(_status(TAKEN_DOWN), col.type))
        elif name == "error_message":
            col = pc.if_else(keep, col, pa.scalar(f"removed by takedown {tid}", col.type))
        elif name not in KEEP_ON_TAKEDOWN and not pa.types.is_null(col.type):
            col = pc.if_else(keep, col, pa.scalar(None, col.type))
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=table.schema)


def _tar_without(data: bytes, keys: set[str]) -> tuple[bytes, int]:
    """The tar's members but those of ``keys``, byte for byte as they were (same headers, same order)."""
    out, dropped = io.BytesIO(), set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as src, tarfile.open(fileobj=out, mode="w|") as dst:
        for member in src.getmembers():
            key = member.name.rsplit("/", 1)[-1].partition(".")[0]
            if key in keys:
                dropped.add(key)
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out.getvalue(), len(dropped)


def _image_manifest(old: dict[str, Any], codes: list[str], tid: str, files: dict[str, bytes]) -> dict[str, Any]:
    new = _next(old, tid)
    counts: dict[str, int] = {}
    for c in codes:
        counts[c] = counts.get(c, 0) + 1
    status = [_status(c) for c in codes]
    new.update(successes=counts.get("ok", 0), codes=dict(sorted(counts.items())),
               failed_to_download=status.count("failed_to_download"),
               failed_to_resize=status.count("failed_to_resize"), filtered=status.count("filtered"),
               errors={k: v for k, v in sorted(counts.items()) if k != "ok"},
               files={name: _digest(data) for name, data in files.items()})
    media = next((n for n in files if n.endswith(".tar")), None) or next(n for n in files if n.endswith(".parquet"))
    new["bytes_written"] = len(files[media])
    return new


def rewrite_image_shard(folder: str, sid: int, sel: Selectors, journal: Journal,
                        check: Check = lambda: None) -> dict[str, Any] | None:
    """The image shard ``sid`` of ``folder`` without the rows ``sel`` matches; its receipt, or None if none does."""
    fs, path = commit.fs_and_path(folder)
    old = commit.read_marker(fs, path, sid)
    if old is None:
        return None
    if (done := _finished(journal, "images", fs, path, sid, old)) is not None:
        return done
    files = old.get("files", {})
    stem = shards.shard_stem(sid, files)
    table = pq.read_table(io.BytesIO(shards._committed_bytes(fs, f"{path}/{stem}.parquet", files)))
    live = np.asarray([c != TAKEN_DOWN for c in table.column("code").to_pylist()], bool)
    mask = match_mask(table, sel) & live
    if not mask.any():
        return None
    new_stem = commit.shard_stem(sid, {"generation": int(old.get("generation") or 0) + 1})
    matched = row_digests(table, mask)
    out: dict[str, bytes] = {}
    if f"{stem}.tar" in files:
        out[f"{new_stem}.tar"], _ = _tar_without(shards._committed_bytes(fs, f"{path}/{stem}.tar", files),
                                                {r["key"] for r in matched})
    buf = io.BytesIO()
    new_table = _mark_rows(table, mask, journal.tid)
    pq.write_table(new_table, buf)
    out[f"{new_stem}.parquet"] = buf.getvalue()
    codes = new_table.column("code").to_pylist()
    if f"{stem}_stats.json" in files:
        stats = json.loads(shards._committed_bytes(fs, f"{path}/{stem}_stats.json", files))
        counts = {c: codes.count(c) for c in sorted(set(codes))}
        stats.update(successes=counts.get("ok", 0), codes=counts, status_dict=counts)
        out[f"{new_stem}_stats.json"] = json.dumps(stats, indent=1).encode()
    new = _image_manifest(old, codes, journal.tid, out)
    return _commit(journal, "images", fs, path, sid, old, new, out, matched, check)


# ---- token shards and side tables --------------------------------------------------------------------------------


def _read_table(fs: Any, path: str, marker: dict[str, Any]) -> pa.Table:
    schema.verify_token_shard(fs, path, marker)
    with fs.open(path, "rb") as f:
        return schema.open_token_shard(f).read()


def rewrite_token_shard(folder: str, sid: int, sel: Selectors, journal: Journal,
                        check: Check = lambda: None) -> dict[str, Any] | None:
    """The token shard ``sid`` without the rows ``sel`` matches (by key, URL or image sha256)."""
    fs, path = commit.fs_and_path(folder)
    old = commit.read_marker(fs, path, sid)
    if old is None:
        return None
    if (done := _finished(journal, "tokens", fs, path, sid, old)) is not None:
        return done
    table = _read_table(fs, commit.shard_file(path, sid, ".parquet", old), old)
    mask = match_mask(table, sel)
    rejected = {k: v for k, v in (old.get("rejected_keys") or {}).items() if k not in sel.keys}
    if not mask.any() and len(rejected) == len(old.get("rejected_keys") or {}):
        return None
    kept = table.filter(pa.array(~mask))
    data = schema.table_bytes(kept)
    new = _next(old, journal.tid)
    keys = kept.column("key").to_pylist()
    reasons: dict[str, int] = {}
    for r in rejected.values():
        reasons[r.split(":")[0]] = reasons.get(r.split(":")[0], 0) + 1
    new.update(rows=len(keys), first_key=keys[0] if keys else None, last_key=keys[-1] if keys else None,
               bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), footer_sha256=schema.footer_sha256(data),
               rejected_keys=dict(sorted(rejected.items())), rejects=dict(sorted(reasons.items())))
    matched = row_digests(table, mask) + [{"key": k, "url_sha256": None, "sha256": None, "rejected": True}
                                            for k in sorted(set(old.get("rejected_keys") or {}) - set(rejected))]
    name = commit.shard_stem(sid, new) + ".parquet"
    return _commit(journal, "tokens", fs, path, sid, old, new, {name: data}, matched, check)


def rewrite_side_table(folder: str, sid: int, removed: set[str], keepers: dict[str, str | None], token: dict | None,
                       journal: Journal, check: Check = lambda: None) -> dict[str, Any] | None:
    """A per-token-shard side table (the dedup one: key, duplicate_of, ...) without the ``removed`` keys; a row
    whose ``duplicate_of`` was removed points at ``keepers[that key]`` (None: it is now its group's first copy).
    ``token``: the token shard's committed marker, which the side table's marker names."""
    fs, path = commit.fs_and_path(folder)
    old = commit.read_marker(fs, path, sid)
    if old is None:
        return None
    if (done := _finished(journal, "dedup", fs, path, sid, old)) is not None:
        return done
    table = _read_table(fs, commit.shard_file(path, sid, ".parquet", old), old)
    keys = table.column("key").to_pylist()
    mask = np.asarray([k in removed for k in keys], bool)
    dup = table.column("duplicate_of").to_pylist() if "duplicate_of" in table.column_names else []
    moved = [i for i, d in enumerate(dup) if d in removed and not mask[i]]
    token_ref = (token or {}).get("footer_sha256") or (token or {}).get("sha256")
    if not mask.any() and not moved and old.get("token_shard") == token_ref:
        return None
    if moved:
        new_dup = list(dup)
        cos = table.column("cosine").to_pylist() if "cosine" in table.column_names else None
        for i in moved:
            target = keepers.get(dup[i])
            new_dup[i] = target if target != keys[i] else None
            if cos is not None:
                cos[i] = None  # the cosine to the new first copy is not recomputed
        table = table.set_column(table.schema.get_field_index("duplicate_of"), table.schema.field("duplicate_of"),
                                 pa.array(new_dup, table.schema.field("duplicate_of").type))
        if cos is not None:
            table = table.set_column(table.schema.get_field_index("cosine"), table.schema.field("cosine"),
                                     pa.array(cos, table.schema.field("cosine").type))
    kept = table.filter(pa.array(~mask))
    data = schema.table_bytes(kept)
    new = _next(old, journal.tid)
    new.update(rows=kept.num_rows, bytes=len(data), footer_sha256=schema.footer_sha256(data), token_shard=token_ref)
    matched = [{"key": k, "url_sha256": None, "sha256": None} for k, m in zip(keys, mask) if m]
    name = commit.shard_stem(sid, new) + ".parquet"
    return _commit(journal, "dedup", fs, path, sid, old, new, {name: data}, matched, check)
