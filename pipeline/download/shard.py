"""One planned shard of the URL list → one committed image shard. ``pipeline.runtime.ray_seam`` runs this as a Ray task.

The formats are img2dataset's: its key scheme names samples, its ``Resizer``'s geometry resizes (through
``pipeline.download.imaging``) and its shard layout is written (``pipeline.download.writer``). Around them: every row
ends with exactly one closed code (see ``CODES``); fetches go through ``pipeline.download.fetch``'s guards; filters
(captions, duplicate URLs decided by the planner, duplicate images by sha256) run here. Rows are written as their
fetches land, in key order (a row waits only for the rows before it), so the shard's files are nearly complete when
its last fetch returns; they go into a staging folder, are moved to their final names, and only then committed with
the marker, so a crash at any point leaves no shard that looks committed and a retry starts clean.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import cv2
import pyarrow as pa

from pipeline.config import DownloadConfig
from pipeline.download.fetch import FETCH_CODES, AddressPolicy, FetchLimits, FetchResult, fetch
from pipeline.download.imaging import IMAGE_CODES, ImageLimits, ImageProcessor
from pipeline.download.slots import NodeSlots, slots_folder
from pipeline.download.writer import SUFFIXES, ShardWriter, sample_key
from pipeline.errors import InputError
from pipeline.forget.request import Selectors
from pipeline.runtime import ray_seam
from pipeline.storage import commit
from pipeline.storage.faults import fault_point
from pipeline.storage.lease import LeaseToken

OOM_SHARD_COUNT = 5  # shard names are {shard:05d}, the same in images/ and tokens/
ROW_CODES = ("empty_caption", "caption_too_long", "bad_caption", "duplicate_url", "duplicate_image", "taken_down")
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
CLAIM_BATCH = 128  # rows per call to the run-wide duplicate-image registry
IMAGE_THREADS = 2  # per shard task: decoding runs beside the fetch threads, not in them
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
    directives = frozenset(d.strip().lower() for d in cfg.disallowed_header_directives) if cfg.honor_opt_out \
        else frozenset()
    return FetchLimits(deadline_s=cfg.deadline, io_timeout_s=cfg.timeout, max_bytes=cfg.max_bytes,
                       max_redirects=cfg.max_redirects, retries=cfg.retries, disallowed_directives=directives,
                       ca_bundle=cfg.ca_bundle, keep_alive=cfg.keep_alive)


def image_processor(cfg: DownloadConfig) -> ImageProcessor:
    return ImageProcessor(cfg.image_size, cfg.resize_mode, cfg.encode_format, cfg.encode_quality,
                          ImageLimits(cfg.max_pixels, cfg.min_image_size, cfg.max_aspect_ratio))


def read_plan(path: str) -> list[dict[str, Any]]:
    return read_plan_table(path).to_pylist()


def read_plan_table(path: str) -> pa.Table:
    fs, p = commit.fs_and_path(path)
    with fs.open(p, "rb") as f:
        return pa.ipc.open_file(f).read_all()


def _scalar_type(t: pa.DataType) -> bool:
    return (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_null(t))


def extra_fields(arrow_path: str, names: list[str], source: str = "") -> list[pa.Field]:
    """The arrow fields of ``download.save_additional_columns`` in a shard plan, in the option's order. Only scalar
    types (bool, integer, float, string; null for a column with no value) travel through the shards' json metadata
    and into the token shards typed; another type is refused naming the column."""
    fs, p = commit.fs_and_path(arrow_path)
    with fs.open(p, "rb") as f:
        sch = pa.ipc.open_file(f).schema
    fields = []
    for name in names:
        t = sch.field(name).type
        if not _scalar_type(t):
            raise InputError(f"{source or arrow_path}: column '{name}' of download.save_additional_columns has type "
                             f"{t}; only bool, integer, float and string columns can be kept")
        fields.append(pa.field(name, t))
    return fields


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
                   claim: ShaClaim | None = None, lease: LeaseToken | None = None,
                   refuse: Selectors | None = None) -> dict[str, Any]:
    """Fetch, check, resize and write one shard, then commit it (only while ``lease`` is still the run's). Raises on
    failure (the caller retries the shard); a failed attempt leaves no staging behind. Rows the run's takedowns
    name (``refuse``: by key or URL, never fetched; by image sha256, dropped once fetched) end ``taken_down``."""
    cv2.setNumThreads(1)  # parallel across images (threads, tasks), not inside one resize
    start = time.time()
    rows = read_plan(plan.arrow_path)
    extras = extra_fields(plan.arrow_path, cfg.save_additional_columns) if cfg.save_additional_columns else []
    oom_rows = math.ceil(math.log10(cfg.shard_size)) if cfg.shard_size > 1 else 1
    keys = [sample_key(i, plan.shard_id, oom_rows, OOM_SHARD_COUNT) for i in range(len(rows))]
    outcomes: list[Outcome | None] = [None] * len(rows)
    for i, row in enumerate(rows):
        if refuse and refuse.matches(keys[i], _text(row.get("url")), None):
            outcomes[i] = Outcome("taken_down", "named by a takedown of this run; not fetched")
        elif i in plan.duplicates:
            outcomes[i] = Outcome("duplicate_url", "URL seen earlier in the input", meta={
                "duplicate_of": plan.duplicates[i]})
        elif "caption" in row:  # a list without captions (txt, or caption_col empty) has nothing to filter
            outcomes[i] = check_caption(row["caption"], cfg)
    todo = [i for i, o in enumerate(outcomes) if o is None]
    limits, policy, proc = fetch_limits(cfg), AddressPolicy(cfg.allow_private_addresses, cfg.allowed_addresses), \
        image_processor(cfg)
    staging = f"{output.rstrip('/')}/_staging/{plan.shard_id:05d}-a{attempt}-{uuid.uuid4().hex[:8]}"
    fs, stage = commit.fs_and_path(staging)
    sink = None
    try:
        fs.makedirs(stage, exist_ok=True)
        writer = ShardWriter(cfg.output_format, staging, plan.shard_id, _meta_schema(extras), cfg.encode_format)
        sink = _Sink(writer, rows, keys, outcomes, claim if cfg.dedup_images else None, [f.name for f in extras])
        verify = cfg.verify_hash[1] if cfg.verify_hash else None
        threads, slots = cfg.thread_count, None
        if cfg.node_connections:  # this task may use the node's whole budget, one slot per fetch
            threads = cfg.node_connections
            slots = NodeSlots(slots_folder(output, ray_seam.node_id()), cfg.node_connections)
        threads = max(1, min(threads, len(todo)))
        for i, out in _fetch_rows(todo, rows, limits, policy, proc, threads, sink.advance, verify, slots):
            if refuse and out.meta.get("sha256") in refuse.sha256:
                out = Outcome("taken_down", "its image bytes are named by a takedown of this run; dropped")
            outcomes[i] = out
            sink.advance()
        sink.advance(final=True)
        sink.writer.close()
        stats = _stats(plan.shard_id, sink.done, start, attempt, sink.bytes_written)
        if extras:  # what tokenize types the json values by
            stats["extra_columns"] = {f.name: str(f.type) for f in extras}
        with fs.open(f"{stage}/{plan.shard_id:05d}_stats.json", "wb") as f:
            f.write(json.dumps(stats, indent=1).encode())
        if lease is not None:
            lease.check()  # a task of a dead or superseded run commits nothing
        return commit_staged(output, staging, plan.shard_id, cfg.output_format, stats)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            needed = (sink.bytes_written if sink is not None else 0) + 512 * len(rows)  # at least this much
            raise commit.storage_full(output, f"writing shard {plan.shard_id:05d}", needed) from None
        raise
    finally:
        try:  # the staging of a failed attempt is removed, so a retry starts on the space it had
            commit.remove(fs, stage, recursive=True)
        except OSError:
            pass


def _fetch_rows(todo: list[int], rows: list[dict[str, Any]], limits: FetchLimits, policy: AddressPolicy,
                proc: ImageProcessor, threads: int, started: Callable[[], None],
                verify: str | None = None, slots: NodeSlots | None = None) -> Iterator[tuple[int, Outcome]]:
    """(row, outcome) for every row of ``todo``, as they finish. ``threads`` fetch threads only fetch: a body goes to
    one of ``IMAGE_THREADS`` image threads (hash, decode, resize, encode; cv2 and hashlib release the GIL), so a fetch
    thread is back on the network while its picture is worked on and ``threads`` connections stay busy. At most
    ``threads + IMAGE_THREADS`` bodies are held at once: when the image threads fall behind, fetch threads wait.
    ``verify``: download.verify_hash's algorithm; each row's expected digest is under that name (the Reader's).
    ``slots``: the node's connection budget (download.node_connections); each fetch holds one slot, taken after
    its permit, so a thread waiting for the image threads holds no slot."""
    results: queue.SimpleQueue = queue.SimpleQueue()
    permits = threading.Semaphore(threads + IMAGE_THREADS)

    def work(i: int, got: FetchResult) -> None:
        try:
            results.put((i, _image(got, proc, (verify, rows[i].get(verify)) if verify else None), None))
        except BaseException as exc:  # noqa: BLE001 — handed to the shard's thread, which raises it
            results.put((i, None, exc))
        finally:
            permits.release()

    def get(i: int) -> None:
        permits.acquire()
        try:
            with slots.hold() if slots is not None else nullcontext():
                got = fetch(rows[i].get("url"), limits, policy)
            if got.code == "ok" and got.body is not None:
                images.submit(work, i, got)
                return
            permits.release()
            results.put((i, _image(got, proc), None))
        except BaseException as exc:  # noqa: BLE001
            permits.release()
            results.put((i, None, exc))

    with ThreadPoolExecutor(IMAGE_THREADS) as images, ThreadPoolExecutor(threads) as fetchers:
        try:
            for i in todo:
                fetchers.submit(get, i)
            started()
            for _ in todo:
                i, out, exc = results.get()
                if exc is not None:
                    raise exc
                yield i, out
        except BaseException:  # the shard fails (or its caller stopped reading): fetch nothing more for it
            fetchers.shutdown(wait=False, cancel_futures=True)
            raise


def _image(got: FetchResult, proc: ImageProcessor, verify: tuple[str, Any] | None = None) -> Outcome:
    """A fetch's outcome: its code when it failed, else the checked, resized picture (and the body's sha256).
    ``verify``: (algorithm, expected hex digest) of the body, as download.verify_hash asks; a mismatch is
    ``hash_mismatch`` before any decode."""
    meta = {"http_status": got.status, "fetch_attempts": got.attempts, "fetch_seconds": got.elapsed}
    if got.code != "ok" or got.body is None:
        return Outcome(got.code, got.message, meta=meta)
    meta["sha256"], meta["bytes"] = hashlib.sha256(got.body).hexdigest(), len(got.body)
    if verify is not None:
        algo, expected = verify
        digest = meta["sha256"] if algo == "sha256" else hashlib.new(algo, got.body).hexdigest()
        want = expected.strip().lower() if isinstance(expected, str) else None
        if digest != want:
            return Outcome("hash_mismatch", f"{algo} of the downloaded bytes is {digest}, the list says "
                           f"{expected if want else 'nothing'}", meta=meta)
    img = proc(got.body)
    meta.update(width=img.width, height=img.height, original_width=img.original_width,
                original_height=img.original_height)
    return Outcome(img.code, img.message, img.data, meta)


def _fetch_one(url: Any, limits: FetchLimits, policy: AddressPolicy, proc: ImageProcessor) -> Outcome:
    """One URL end to end, on the calling thread (what every row goes through, without the thread pools)."""
    return _image(fetch(url, limits, policy), proc)


class _Sink:
    """Rows to the shard's writer in key order, as soon as every row before them has its outcome.

    Duplicate images keep the first key: within the shard by key order (rows are decided in that order), across
    shards through ``claim`` — the run-wide registry, asked in batches of ``CLAIM_BATCH`` rows, the first shard to
    claim an image owning it — and every copy names the run-wide owner, not this shard's first copy.
    """

    def __init__(self, writer: ShardWriter, rows: list[dict[str, Any]], keys: list[str],
                 outcomes: list[Outcome | None], claim: ShaClaim | None, extras: list[str] | None = None):
        self.writer, self.rows, self.keys, self.outcomes, self.claim = writer, rows, keys, outcomes, claim
        self.extras = extras or []  # download.save_additional_columns, carried from the input row as they are
        self.next = 0
        self.batch: list[int] = []
        self.first: dict[str, str] = {}  # sha256 → key of its first row in this shard
        self.owner: dict[str, str] = {}  # sha256 → its run-wide owner, as claimed
        self.done: list[Outcome] = []
        self.bytes_written = 0

    def advance(self, final: bool = False) -> None:
        while self.next < len(self.outcomes) and (o := self.outcomes[self.next]) is not None:
            if self.claim is not None and o.code == "ok":
                sha = o.meta["sha256"]
                if sha in self.first:
                    _mark_duplicate(o, self.first[sha])
                else:
                    self.first[sha] = self.keys[self.next]
            self.batch.append(self.next)
            self.next += 1
        if self.batch and (final or len(self.batch) >= CLAIM_BATCH or self.claim is None):
            self._flush()

    def _flush(self) -> None:
        if self.claim is not None:
            pairs = [(o.meta["sha256"], self.keys[i]) for i in self.batch
                     if (o := self.outcomes[i]) is not None and o.code == "ok"]
            if pairs:
                self.owner.update(self.claim(pairs))
        for i in self.batch:
            o, key = self.outcomes[i], self.keys[i]
            assert o is not None
            owner = self.owner.get(o.meta.get("sha256") or "", key)
            if o.code in ("ok", "duplicate_image") and owner != key:
                _mark_duplicate(o, owner)
            self._write(self.rows[i], key, o)
        self.batch = []

    def _write(self, row: dict[str, Any], key: str, o: Outcome) -> None:
        caption = _text(row.get("caption"))
        meta = {name: None for name in META_SCHEMA.names}
        meta.update(key=key, url=_text(row.get("url")), caption=caption, status=_STATUS[o.code], code=o.code,
                    error_message=o.message or None, retry_of=row.get("retry_of"))
        meta.update({k: v for k, v in o.meta.items() if k in meta})
        meta.update({k: row.get(k) for k in self.extras})
        if o.code == "taken_down":  # a row a takedown named keeps its key only
            meta.update({k: None for k in meta if k not in ("key", "status", "code", "error_message")})
            caption = None
        self.writer.write(o.data, key, caption, meta)
        self.bytes_written += len(o.data) if o.data is not None else 0
        o.data = None  # written: the shard holds no image bytes it no longer needs
        self.done.append(o)


def _meta_schema(extras: list[pa.Field]) -> pa.Schema:
    """img2dataset's metadata columns, then the additional columns (as its writers place them: after the input's)."""
    schema = META_SCHEMA
    for f in extras:
        schema = schema.append(f)
    return schema


def _mark_duplicate(o: Outcome, first_key: str) -> None:
    o.code, o.message, o.data = "duplicate_image", f"same bytes as {first_key}", None
    o.meta["duplicate_of"] = first_key


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _stats(shard_id: int, outcomes: list[Outcome], start: float, attempt: int, bytes_written: int) -> dict[str, Any]:
    codes = Counter(o.code for o in outcomes)
    status = Counter(_STATUS[o.code] for o in outcomes)
    end = time.time()
    return {
        "shard_id": shard_id, "count": len(outcomes), "successes": codes.get("ok", 0),
        "failed_to_download": status.get("failed_to_download", 0),
        "failed_to_resize": status.get("failed_to_resize", 0), "filtered": status.get("filtered", 0),
        "codes": dict(sorted(codes.items())), "status_dict": dict(sorted(codes.items())),
        "bytes_downloaded": sum(o.meta.get("bytes") or 0 for o in outcomes),
        "bytes_written": bytes_written,
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
    for suffix in SUFFIXES[output_format] + ("_stats.json",):
        _move_into_place(fs, f"{stage}/{name}{suffix}", f"{out}/{name}{suffix}")
        files[name + suffix] = {"bytes": fs.size(f"{out}/{name}{suffix}"),
                                "sha256": commit.sha256_file(fs, f"{out}/{name}{suffix}")}
    manifest = {k: stats[k] for k in ("shard_id", "count", "successes", "failed_to_download", "failed_to_resize",
                                      "filtered", "codes", "bytes_downloaded", "bytes_written", "start_time",
                                      "end_time", "attempt")}
    manifest.update(files=files, format=output_format, errors={k: v for k, v in stats["codes"].items() if k != "ok"})
    if stats.get("extra_columns"):
        manifest["extra_columns"] = stats["extra_columns"]
    fault_point("shard-commit", shard_id)  # files in place, marker not yet: the worst moment to die
    commit.write_marker(fs, out, shard_id, manifest)
    try:
        commit.remove(fs, stage, recursive=True)
    except OSError:
        pass
    return manifest
