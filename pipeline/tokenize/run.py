"""The tokenize stage as a run: committed image shards → decode tasks → encoder actors → one committed token shard
per image shard with the same keys (``pipeline.tokenize.writer``), and the run's summary.

The driver commits a shard when every one of its rows has come back (encoded or rejected), so a crash anywhere
loses only uncommitted work, and a rerun redoes exactly the shards without a marker. Stage logic only: the Ray Data
pipeline is the seam's (``pipeline.runtime.ray_seam.stream_batches``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline.config import Config
from pipeline.errors import NotFoundError
from pipeline.runtime import ray_seam
from pipeline.runtime.progress import Progress
from pipeline.storage import commit, shards
from pipeline.storage.lease import Lease
from pipeline.tokenize.encode import Encoder, EncoderSpec, decode_shard
from pipeline.tokenize.writer import ShardAssembler

log = logging.getLogger(__name__)


class _Decode:
    """The decode step of one run, as a picklable callable for the seam's ``flat_map``."""

    def __init__(self, images: str, size: int, files: dict[int, dict[str, Any]]):
        self.images, self.size, self.files = images, size, files

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        sid = int(item["shard_id"])
        return decode_shard(self.images, sid, self.size, int(item["expected"]), self.files[sid])


def run_tokenize(cfg: Config, spec: EncoderSpec, encoder_threads: int = 1) -> dict[str, Any]:
    """Every committed image shard not yet tokenized, tokenized, under the token folder's lease; the run's summary
    (also ``_summary.json``)."""
    images, tokens = cfg.path("tokens_input"), cfg.path("tokens")
    image_shards = shards.committed_image_shards(images)
    if not image_shards:
        raise NotFoundError(f"{images}: no committed image shards to tokenize")
    with Lease(tokens, "tokenize") as lease:
        return _run(cfg, spec, encoder_threads, image_shards, lease)


def _run(cfg: Config, spec: EncoderSpec, encoder_threads: int, image_shards: dict[int, dict[str, Any]],
         lease: Lease) -> dict[str, Any]:
    images, tokens = cfg.path("tokens_input"), cfg.path("tokens")
    fs, out = commit.fs_and_path(tokens)
    commit.clear_debris(fs, out)  # temporary files of a killed run: ours to remove while we hold the lease
    settings = {"images": images, "spec": spec.__dict__}
    commit.claim_run(fs, out, "tokenize", settings)  # a changed model or preprocessing is refused before any write
    done = set(commit.committed_shards(fs, out))
    todo = {s: m["successes"] for s, m in image_shards.items() if s not in done}
    metadata = Encoder(spec).metadata()
    expected_rows = sum(todo.values())
    log.info("tokenize: %d shards (%d rows) to encode, %d already committed", len(todo), expected_rows, len(done))
    progress = Progress("tokenize", total=expected_rows, unit="rows")
    assembler = ShardAssembler(tokens, metadata, todo, on_rows=progress.update, before_commit=lease.token.check)
    for s in [s for s, n in todo.items() if n == 0]:  # a shard whose every URL failed gets an empty token shard
        assembler.commit(s)
    work = {s: n for s, n in todo.items() if n > 0}
    if work:
        decode = _Decode(images, cfg.download.image_size, {s: image_shards[s].get("files", {}) for s in work})
        gpus = 1 if ray_seam.cluster_gpus() >= 1 else 0  # encoder actors on GPUs when there are any
        for batch in ray_seam.stream_batches([{"shard_id": s, "expected": n} for s, n in work.items()], decode,
                                             Encoder, {"spec": spec, "threads": encoder_threads},
                                             cfg.tokenize.batch_size, cfg.tokenize.num_encoders, gpus):
            assembler.add(batch)
        missing = assembler.missing()
        if missing:
            raise RuntimeError(f"tokenize: shards never completed (missing rows): {missing}")
    progress.close()
    written = assembler.written
    n_rejects = sum(sum(m.get("rejects", {}).values()) for m in written.values())
    summary = {"shards_written": len(written), "shards_skipped": len(done), "shards_failed": assembler.failed,
               "rows_in": expected_rows, "rows": sum(m["rows"] for m in written.values()), "rejects": n_rejects,
               "seconds": progress.elapsed, "rows_per_s": expected_rows / max(progress.elapsed, 1e-9)}
    if written or assembler.failed or not fs.exists(f"{out}/_summary.json"):  # a no-op rerun rewrites nothing
        commit.atomic_write(fs, f"{out}/_summary.json", json.dumps(summary, indent=1).encode())
    return summary
