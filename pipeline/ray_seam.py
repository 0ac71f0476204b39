"""The Ray seam: download shards as Ray tasks, tokenize with Ray Data. Only this module (and jobs/) imports ray."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import numpy as np
import ray

from pipeline import commit, download, shards
from pipeline.config import Config
from pipeline.progress import Progress

log = logging.getLogger(__name__)

_RUNTIME_ENV = {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}}


def init_ray(cfg: Config) -> None:
    """Join ``cfg.ray_address`` (or the job's RAY_ADDRESS) if set, else start a local cluster of ``num_cpus`` CPUs."""
    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:  # a Ray job (RAY_ADDRESS is set by `ray job submit`) or an explicit cluster
        ray.init(address=address, runtime_env=_RUNTIME_ENV, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, runtime_env=_RUNTIME_ENV,
                 log_to_driver=True, configure_logging=False)
    # Ray Data's own progress bars are noisy in logs; the stages print their own progress lines.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


@ray.remote(num_cpus=1, max_retries=2)  # max_retries: the worker process died (OOM, node loss)
def _download_task(dcfg, output: str, plan: download.ShardPlan, attempt: int) -> dict[str, Any]:
    return download.download_shard(dcfg, output, plan, attempt)


def run_download(cfg: Config) -> dict[str, Any]:
    """Every shard of the URL list downloaded and committed, or reported failed. Returns the run summary."""
    dcfg = cfg.download
    output = cfg.path("images")
    files = download.expand_input(dcfg.input)
    fs, out = commit.fs_and_path(output)
    commit.claim_run(fs, out, "download", download.shard_settings(dcfg, files))
    done = set(commit.committed_shards(fs, out))
    tmp_dir = os.path.join(cfg.run_dir, "_tmp", "download")
    plans = download.plan_shards(dcfg, files, done, tmp_dir)
    log.info("download: %d shards to fetch, %d already committed", len(plans), len(done))
    progress = Progress("download", total=len(plans), unit="shards")
    pending: dict[ray.ObjectRef, tuple[download.ShardPlan, int]] = {}
    queue = [(p, 0) for p in plans]
    failed: dict[int, str] = {}
    while queue or pending:
        while queue and len(pending) < dcfg.max_in_flight:  # backpressure: bounded in-flight shards
            plan, attempt = queue.pop(0)
            pending[_download_task.remote(dcfg, output, plan, attempt)] = (plan, attempt)
        ready, _ = ray.wait(list(pending), num_returns=1)
        plan, attempt = pending.pop(ready[0])
        try:
            manifest = ray.get(ready[0])
            progress.update(1, f"shard {plan.shard_id:05d}: {manifest['successes']}/{manifest['count']} ok")
        except Exception as exc:  # noqa: BLE001 — a shard failure is retried, then reported, never dropped
            if attempt < dcfg.shard_retries:
                log.warning("shard %05d attempt %d failed (%s); retrying", plan.shard_id, attempt + 1, exc)
                queue.append((plan, attempt + 1))
            else:
                failed[plan.shard_id] = f"{type(exc).__name__}: {exc}"
                progress.update(1, f"shard {plan.shard_id:05d} FAILED")
    progress.close()
    return summarize_download(output, failed)


def summarize_download(output: str, failed: dict[int, str]) -> dict[str, Any]:
    fs, out = commit.fs_and_path(output)
    committed = commit.committed_shards(fs, out)
    errors: dict[str, int] = defaultdict(int)
    for m in committed.values():
        for reason, n in m["errors"].items():
            if reason != "success":
                errors[reason] += n
    return {
        "shards_committed": len(committed), "shards_failed": {f"{k:05d}": v for k, v in failed.items()},
        "count": sum(m["count"] for m in committed.values()),
        "successes": sum(m["successes"] for m in committed.values()),
        "failed_to_download": sum(m["failed_to_download"] for m in committed.values()),
        "failed_to_resize": sum(m["failed_to_resize"] for m in committed.values()), "errors": dict(errors),
    }


def run_tokenize(cfg: Config, spec, encoder_threads: int = 1) -> dict[str, Any]:
    """Ray Data: committed image shards → decode (CPU tasks) → encoder actor pool → one token shard per image shard."""
    from pipeline.tokenize import Encoder, decode_shard, write_token_shard

    images, tokens = cfg.path("tokens_input"), cfg.path("tokens")
    image_shards = shards.committed_image_shards(images)
    if not image_shards:
        raise FileNotFoundError(f"{images}: no committed image shards to tokenize")
    fs, out = commit.fs_and_path(tokens)
    settings = {"images": images, "spec": spec.__dict__, "image_shards": sorted(image_shards)}
    commit.claim_run(fs, out, "tokenize", {k: v for k, v in settings.items() if k != "image_shards"})
    done = set(commit.committed_shards(fs, out))
    todo = {s: m["successes"] for s, m in image_shards.items() if s not in done}
    metadata = Encoder(spec).metadata()
    expected_rows = sum(todo.values())
    log.info("tokenize: %d shards (%d rows) to encode, %d already committed", len(todo), expected_rows, len(done))
    progress = Progress("tokenize", total=expected_rows, unit="rows")
    written: dict[str, Any] = {}
    empty = [s for s, n in todo.items() if n == 0]
    for s in empty:  # a shard whose every URL failed still gets an (empty) committed token shard
        written[f"{s:05d}"] = write_token_shard(tokens, s, _empty_rows(metadata), metadata)
    todo = {s: n for s, n in todo.items() if n > 0}
    if todo:
        size = cfg.download.image_size
        ds = ray.data.from_items([{"shard_id": s, "expected": n} for s, n in todo.items()],
                                 override_num_blocks=len(todo))
        ds = ds.flat_map(lambda r: decode_shard(images, int(r["shard_id"]), size, int(r["expected"])))
        ds = ds.map_batches(Encoder, fn_constructor_kwargs={"spec": spec, "threads": encoder_threads},
                            batch_size=cfg.tokenize.batch_size, concurrency=cfg.tokenize.num_encoders,
                            batch_format="numpy")
        buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        counts: dict[int, int] = defaultdict(int)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for s in np.unique(batch["shard_id"]):
                sel = batch["shard_id"] == s
                buffers[int(s)].append({k: v[sel] for k, v in batch.items()})
                counts[int(s)] += int(sel.sum())
                progress.update(int(sel.sum()))
                if counts[int(s)] == todo[int(s)]:  # the shard is whole: commit it, free its rows
                    rows = _concat(buffers.pop(int(s)))
                    written[f"{int(s):05d}"] = write_token_shard(tokens, int(s), rows, metadata)
        missing = {s: todo[s] - counts[s] for s in todo if f"{s:05d}" not in written}
        if missing:
            raise RuntimeError(f"tokenize: shards never completed (missing rows): {missing}")
    progress.close()
    return {"shards_written": len(written), "shards_skipped": len(done), "rows": expected_rows,
            "seconds": progress.elapsed, "rows_per_s": expected_rows / max(progress.elapsed, 1e-9)}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in parts[0]:
        if k == "text_tokens":
            out[k] = [list(r) for p in parts for r in p[k]]
        else:
            out[k] = np.concatenate([p[k] for p in parts])
    out["key"] = [str(k) for k in out["key"]]
    return out


def _empty_rows(metadata: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {k: [] for k in ("key", "url", "caption", "sha256", "width", "height", "text_tokens")}
    rows["image_tokens"] = np.zeros((0, metadata["grid"] ** 2), np.uint16)
    rows["clip_image_emb"] = rows["clip_text_emb"] = np.zeros((0, metadata["embed_dim"]), np.float16)
    rows["clip_similarity"] = np.zeros(0, np.float32)
    return rows


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
