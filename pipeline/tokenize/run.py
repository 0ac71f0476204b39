"""The tokenize stage as a run: committed image shards → decode tasks → encoder actors, each of which commits the
token shards it encodes (``pipeline.tokenize.worker``): one token shard per image shard with the same keys.

A shard is committed by the actor once every one of its rows is in (encoded or rejected), so a crash anywhere loses
only uncommitted work, and a rerun redoes exactly the shards without a marker. The driver (on a cluster, the job
driver on the head) does bookkeeping only: the plan, the lease, the markers it is handed back, the summary. Stage
logic only: the actors and tasks are the seam's (``pipeline.runtime.ray_seam.shard_workers``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline.config import Config
from pipeline.errors import NotFoundError
from pipeline.forget import record
from pipeline.runtime import ray_seam
from pipeline.runtime.progress import Progress
from pipeline.storage import commit, shards
from pipeline.storage.lease import Lease
from pipeline.tokenize.encode import Encoder, EncoderSpec
from pipeline.tokenize.worker import DecodeShard, ShardTokenizer
from pipeline.tokenize.writer import ShardAssembler

log = logging.getLogger(__name__)


def run_tokenize(cfg: Config, spec: EncoderSpec, encoder_threads: int = 1) -> dict[str, Any]:
    """Every committed image shard not yet tokenized, tokenized, under the token folder's lease; the run's summary
    (also ``_summary.json``)."""
    images, tokens = cfg.path("tokens_input"), cfg.path("tokens")
    image_shards = shards.committed_image_shards(images)
    if not image_shards:
        raise NotFoundError(f"{images}: no committed image shards to tokenize")
    tc = cfg.tokenize  # hardware the cluster must be able to offer, checked before any work
    ray_seam.check_demand(cfg, f"tokenize.num_encoders={tc.num_encoders} encoder actors of tokenize.cpus_per_worker"
                          " / gpus_per_worker / resources", tc.request(), tc.num_encoders)
    ray_seam.check_demand(cfg, "tokenize.decode_cpus / decode_resources (a decode task)",
                          {"CPU": tc.decode_cpus, **tc.decode_resources})
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
    # The models' provenance, read where the encoders run (loading CLIP is no job for the head node).
    metadata = ray_seam.run_on_workers(_encoder_metadata, [(spec,)], cfg.tokenize.request())[0]
    expected_rows = sum(todo.values())
    log.info("tokenize: %d shards (%d rows) to encode, %d already committed", len(todo), expected_rows, len(done))
    progress = Progress("tokenize", total=expected_rows, unit="rows")
    extras = {s: image_shards[s].get("extra_columns") or {} for s in todo}  # download.save_additional_columns
    assembler = ShardAssembler(tokens, metadata, todo, on_rows=progress.update, before_commit=lease.token.check,
                               extra_columns=extras)
    for s in [s for s, n in todo.items() if n == 0]:  # a shard whose every URL failed gets an empty token shard
        assembler.commit(s)
    work = {s: n for s, n in todo.items() if n > 0}
    if work:
        _tokenize_on_workers(cfg, spec, encoder_threads, image_shards, work, metadata, lease, assembler, progress)
    progress.close()
    written = assembler.written
    n_rejects = sum(sum(m.get("rejects", {}).values()) for m in written.values())
    summary = {"shards_written": len(written), "shards_skipped": len(done), "shards_failed": assembler.failed,
               "rows_in": expected_rows, "rows": sum(m["rows"] for m in written.values()), "rejects": n_rejects,
               "seconds": progress.elapsed, "rows_per_s": expected_rows / max(progress.elapsed, 1e-9)}
    if written or assembler.failed or not fs.exists(f"{out}/_summary.json"):  # a no-op rerun rewrites nothing
        commit.atomic_write(fs, f"{out}/_summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _encoder_metadata(spec: EncoderSpec) -> dict[str, Any]:
    return Encoder(spec).metadata()


def _tokenize_on_workers(cfg: Config, spec: EncoderSpec, encoder_threads: int, image_shards: dict[int, Any],
                         work: dict[int, int], metadata: dict[str, Any], lease: Lease, assembler: ShardAssembler,
                         progress: Progress) -> None:
    """Each shard of ``work`` to an encoder actor that commits it (``ShardTokenizer``), fed by a decode task; at
    most two shards per actor in flight. The actors' markers land in ``assembler.written`` / ``failed``."""
    tc = cfg.tokenize
    images, tokens = cfg.path("tokens_input"), cfg.path("tokens")
    decode = DecodeShard(images, cfg.download.image_size, {s: image_shards[s].get("files", {}) for s in work},
                         tc.batch_size, record.refusals(cfg.path("takedowns")) or None)
    submit = ray_seam.shard_workers(
        ShardTokenizer, {"spec": spec, "tokens": tokens, "metadata": metadata, "lease": lease.token,
                         "threads": encoder_threads, "gpus": tc.gpus_per_worker, "require_gpu": tc.require_gpu},
        tc.num_encoders, tc.request(), decode, {"CPU": tc.decode_cpus, **tc.decode_resources}, name="Encoder")

    def done(item: dict[str, Any], result: dict[str, Any]) -> None:
        assembler.written.update(result.get("written", {}))
        assembler.failed.update(result.get("failed", {}))
        progress.update(int(result["rows_in"]))

    def lost(item: dict[str, Any], error: str) -> None:
        assembler.failed[f"{item['shard_id']:05d}"] = error
        progress.update(int(item["expected"]))

    items = [{"shard_id": s, "expected": n, "extra_columns": image_shards[s].get("extra_columns") or {}}
             for s, n in sorted(work.items())]
    ray_seam.run_bounded(submit, items,
                         max_in_flight=2 * tc.num_encoders, retries=tc.shard_retries, on_result=done,
                         on_failure=lost, name=lambda item: f"token shard {item['shard_id']:05d}")
    missing = [s for s in work if f"{s:05d}" not in assembler.written and f"{s:05d}" not in assembler.failed]
    if missing:
        raise RuntimeError(f"tokenize: shards never completed: {missing}")
