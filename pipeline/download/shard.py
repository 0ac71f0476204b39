"""One planned shard of the URL list → one committed image shard. ``pipeline.runtime.ray_seam`` runs this as a Ray task.

img2dataset's pieces do the formats: its ``compute_key`` names samples, its ``Resizer`` (through
``pipeline.download.imaging``) resizes and its ``WebDatasetSampleWriter`` / ``ParquetSampleWriter`` write the shard.
Around them: every row ends with exactly one closed code (see ``CODES``); fetches go through
``pipeline.download.fetch``'s guards; filters (captions, duplicate URLs decided by the planner, duplicate images by
sha256) run here; and the shard is written into a staging folder, moved to its final names, and only then committed
with its marker, so a crash at any point leaves no shard that looks committed and a retry starts clean.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import pyarrow as pa
from img2dataset.downloader import compute_key
from img2dataset.writer import ParquetSampleWriter, WebDatasetSampleWriter

from pipeline.config import DownloadConfig
from pipeline.download.fetch import FETCH_CODES, AddressPolicy, FetchLimits, fetch
from pipeline.download.imaging import IMAGE_CODES, ImageLimits, ImageProcessor
from pipeline.storage import commit
from pipeline.storage.faults import fault_point
from pipeline.storage.lease import LeaseToken

OOM_SHARD_COUNT = 5  # shard names are {shard:05d}, the same in images/ and tokens/
ROW_CODES = ("empty_caption", "caption_too_long", "bad_caption", "duplicate_url", "duplicate_image")
CODES = ("ok",) + FETCH_CODES + IMAGE_CODES + ROW_CODES
_STATUS = {**{c: "failed_to_download" for c in FETCH_CODES}, **{c: "failed_to_resize" for c in IMAGE_CODES},
           **{c: "filtered" for c in ROW_CODES}, "ok": "success"}
META_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("code", pa.string()), ("error_message", pa.string()), ("http_status", pa.int32()), ("width", pa.int32()),
    ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("sha256", pa.string()), ("bytes", pa.int64()), ("fetch_attempts", pa.int32()), ("fetch_seconds", pa.float32()),
    ("duplicate_of", pa.string()), ("retry_of", pa.string()),
])
WRITERS = {"webdataset": (WebDatasetSampleWriter, (".tar", ".parquet")),
           "parquet": (ParquetSampleWriter, (".parquet",))}
ShaClaim = Callable[[list[tuple[str, str]]], dict[str, str]]


@dataclass
class ShardPlan:
    shard_id: int
    arrow_path: str
    duplicates: dict[int, str] = field(default_factory=dict)
    """Row index → key of the first row with the same URL (decided by the planner over the whole input)."""


@dataclass
class Outcome:
    code: str
    message: str = ""
    data: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def fetch_limits(cfg: DownloadConfig) -> FetchLimits:
    directives = frozenset({"noai", "noimageai"}) if cfg.honor_opt_out else frozenset()
    return FetchLimits(deadline_s=cfg.deadline, io_timeout_s=cfg.timeout, max_bytes=cfg.max_bytes,
                       max_redirects=cfg.max_redirects, retries=cfg.retries, disallowed_directives=directives)


def image_processor(cfg: DownloadConfig) -> ImageProcessor:
    return ImageProcessor(cfg.image_size, cfg.resize_mode, cfg.encode_format, cfg.encode_quality,
                          ImageLimits(cfg.max_pixels, cfg.min_image_size, cfg.max_aspect_ratio))


def read_plan(path: str) -> list[dict[str, Any]]:
    fs, p = commit.fs_and_path(path)
    with fs.open(p, "rb") as f:
        return pa.ipc.open_file(f).read_all().to_pylist()


def check_caption(caption: Any, cfg: DownloadConfig) -> Outcome | None:
    """Per-row caption filters; None when the caption is fine."""
    if isinstance(caption, bytes):  # pyarrow reads a CSV column holding non-UTF-8 bytes as binary
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Outcome("bad_caption", f"caption bytes are not UTF-8 (at byte {exc.start})")
    if caption is None or (isinstance(caption, str) and not caption.strip()):
        return Outcome("empty_caption", "caption is empty") if cfg.drop_empty_captions else None
    text = caption if isinstance(caption, str) else str(caption)
    if "\ufffd" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return Outcome("bad_caption", "caption is not valid UTF-8 text")
    if len(text.encode("utf-8", "surrogatepass")) > cfg.max_caption_bytes:
        return Outcome("caption_too_long", f"caption longer than {cfg.max_caption_bytes} bytes")
    return None


def download_shard(cfg: DownloadConfig, output: str, plan: ShardPlan, attempt: int,
                   claim: ShaClaim | None = None, lease: LeaseToken | None = None) -> dict[str, Any]:
    """Fetch, check, resize and write one shard, then commit it (only while ``lease`` is still the run's). Raises on
    failure (the caller retries the shard); a failed attempt leaves no staging behind."""
    cv2.setNumThreads(1)  # one shard task per CPU: each resize stays on its own core
    start = time.time()
    rows = read_plan(plan.arrow_path)
    oom_rows = math.ceil(math.log10(cfg.shard_size)) if cfg.shard_size > 1 else 1
    keys = [compute_key(i, plan.shard_id, oom_rows, OOM_SHARD_COUNT) for i in range(len(rows))]
    outcomes: list[Outcome | None] = [None] * len(rows)
    for i, row in enumerate(rows):
        if i in plan.duplicates:
            outcomes[i] = Outcome("duplicate_url", "URL seen earlier in the input", meta={
                "duplicate_of": plan.duplicates[i]})
        else:
            outcomes[i] = check_caption(row.get("caption"), cfg)
    todo = [i for i, o in enumerate(outcomes) if o is None]
    limits, policy, proc = fetch_limits(cfg), AddressPolicy(cfg.allow_private_addresses, cfg.allowed_addresses), \
        image_processor(cfg)
    with ThreadPoolExecutor(cfg.thread_count) as pool:  # cv2 releases the GIL: threads also overlap the resizing
        for i, out in zip(todo, pool.map(lambda i: _fetch_one(rows[i].get("url"), limits, policy, proc), todo)):
            outcomes[i] = out
    done: list[Outcome] = [o for o in outcomes if o is not None]
    _dedup_images(done, keys, claim if cfg.dedup_images else None)
    staging = f"{output.rstrip('/')}/_staging/{plan.shard_id:05d}-a{attempt}-{uuid.uuid4().hex[:8]}"
    fs, stage = commit.fs_and_path(staging)
    try:
        fs.makedirs(stage, exist_ok=True)
        _write(cfg, staging, plan.shard_id, rows, keys, done)
        stats = _stats(plan.shard_id, done, start, attempt)
        with fs.open(f"{stage}/{plan.shard_id:05d}_stats.json", "wb") as f:
            f.write(json.dumps(stats, indent=1).encode())
        if lease is not None:
            lease.check()  # a task of a dead or superseded run commits nothing
        return commit_staged(output, staging, plan.shard_id, cfg.output_format, stats)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            needed = sum(len(o.data) for o in done if o.data is not None) + 512 * len(done)
            raise commit.storage_full(output, f"writing shard {plan.shard_id:05d}", needed) from None
        raise
    finally:
        try:  # the staging of a failed attempt is removed, so a retry starts on the space it had
            commit.remove(fs, stage, recursive=True)
        except OSError:
            pass


def _fetch_one(url: Any, limits: FetchLimits, policy: AddressPolicy, proc: ImageProcessor) -> Outcome:
    got = fetch(url, limits, policy)
    meta = {"http_status": got.status, "fetch_attempts": got.attempts, "fetch_seconds": got.elapsed}
    if got.code != "ok" or got.body is None:
        return Outcome(got.code, got.message, meta=meta)
    meta["sha256"], meta["bytes"] = hashlib.sha256(got.body).hexdigest(), len(got.body)
    img = proc(got.body)
    meta.update(width=img.width, height=img.height, original_width=img.original_width,
                original_height=img.original_height)
    return Outcome(img.code, img.message, img.data, meta)


def _dedup_images(outcomes: list[Outcome], keys: list[str], claim: ShaClaim | None) -> None:
    """Same image bytes twice in a run: the first key keeps it. Within the shard by key order, across via ``claim``."""
    if claim is None:
        return
    first: dict[str, str] = {}
    pairs = []
    for o, key in zip(outcomes, keys):
        if o.code != "ok":
            continue
        sha = o.meta["sha256"]
        if sha in first:
            _mark_duplicate(o, first[sha])
        else:
            first[sha] = key
            pairs.append((sha, key))
    owners = claim(pairs) if pairs else {}
    for o, key in zip(outcomes, keys):  # point every copy at the run-wide owner, not at this shard's first copy
        owner = owners.get(o.meta.get("sha256") or "", key)
        if o.code in ("ok", "duplicate_image") and owner != key:
            _mark_duplicate(o, owner)


def _mark_duplicate(o: Outcome, first_key: str) -> None:
    o.code, o.message, o.data = "duplicate_image", f"same bytes as {first_key}", None
    o.meta["duplicate_of"] = first_key


def _write(cfg: DownloadConfig, staging: str, shard_id: int, rows: list[dict[str, Any]], keys: list[str],
           outcomes: list[Outcome]) -> None:
    writer_cls, _ = WRITERS[cfg.output_format]
    writer = writer_cls(shard_id, staging, True, OOM_SHARD_COUNT, META_SCHEMA, cfg.encode_format)
    for row, key, o in zip(rows, keys, outcomes):
        caption = _text(row.get("caption"))
        meta = {name: None for name in META_SCHEMA.names}
        meta.update(key=key, url=_text(row.get("url")), caption=caption,
                    status=_STATUS[o.code], code=o.code, error_message=o.message or None,
                    retry_of=row.get("retry_of"))
        meta.update({k: v for k, v in o.meta.items() if k in meta})
        writer.write(o.data, key, caption, meta)
    writer.close()


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _stats(shard_id: int, outcomes: list[Outcome], start: float, attempt: int) -> dict[str, Any]:
    codes = Counter(o.code for o in outcomes)
    status = Counter(_STATUS[o.code] for o in outcomes)
    end = time.time()
    return {
        "shard_id": shard_id, "count": len(outcomes), "successes": codes.get("ok", 0),
        "failed_to_download": status.get("failed_to_download", 0),
        "failed_to_resize": status.get("failed_to_resize", 0), "filtered": status.get("filtered", 0),
        "codes": dict(sorted(codes.items())), "status_dict": dict(sorted(codes.items())),
        "bytes_downloaded": sum(o.meta.get("bytes") or 0 for o in outcomes),
        "bytes_written": sum(len(o.data) for o in outcomes if o.data is not None),
        "start_time": start, "end_time": end, "duration": end - start, "attempt": attempt,
    }


def _move_into_place(fs: Any, src: str, dst: str) -> None:
    fs.mv(src, dst)


def commit_staged(output: str, staging: str, shard_id: int, output_format: str,
                  stats: dict[str, Any]) -> dict[str, Any]:
    """Staged files → final names → marker (last). Until the marker exists the shard is not committed."""
    fs, out = commit.fs_and_path(output)
    _, stage = commit.fs_and_path(staging)
    name = f"{shard_id:05d}"
    files = {}
    for suffix in WRITERS[output_format][1] + ("_stats.json",):
        _move_into_place(fs, f"{stage}/{name}{suffix}", f"{out}/{name}{suffix}")
        files[name + suffix] = {"bytes": fs.size(f"{out}/{name}{suffix}"),
                                "sha256": commit.sha256_file(fs, f"{out}/{name}{suffix}")}
    manifest = {k: stats[k] for k in ("shard_id", "count", "successes", "failed_to_download", "failed_to_resize",
                                      "filtered", "codes", "bytes_downloaded", "bytes_written", "start_time",
                                      "end_time", "attempt")}
    manifest.update(files=files, format=output_format, errors={k: v for k, v in stats["codes"].items() if k != "ok"})
    fault_point("shard-commit", shard_id)  # files in place, marker not yet: the worst moment to die
    commit.write_marker(fs, out, shard_id, manifest)
    try:
        commit.remove(fs, stage, recursive=True)
    except OSError:
        pass
    return manifest
