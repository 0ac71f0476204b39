"""The Ray seam: download shards as Ray tasks, tokenize with Ray Data. Only this module (and jobs/) imports ray."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

import numpy as np
import ray

from pipeline.config import Config
from pipeline.download import planner as download
from pipeline.runtime.progress import Progress
from pipeline.storage import commit, shards

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


@ray.remote(num_cpus=0)
class ShaRegistry:
    """Run-wide first owner of each image sha256 (duplicate-image filter). Seeded from committed shards on resume.

    It is pinned to the driver's node (the head on a cluster), so losing a worker node never loses it. One actor
    holds every kept image's sha prefix; at LAION scale (10^8 images) that is a few GB, so shard it by
    prefix when you get there.
    """

    def __init__(self) -> None:
        self.owner: dict[int, str] = {}

    def claim(self, pairs: list[tuple[str, str]]) -> dict[str, str]:
        return {sha: self.owner.setdefault(int(sha[:16], 16), key) for sha, key in pairs}


@ray.remote(num_cpus=1, max_retries=2)  # max_retries: the worker process died (OOM, node loss)
def _download_task(dcfg, output: str, plan, attempt: int, registry) -> dict[str, Any]:
    from pipeline.download.shard import download_shard

    return download_shard(dcfg, output, plan, attempt, lambda pairs: ray.get(registry.claim.remote(pairs)))


# What tasks may learn from the driver's environment about object storage: where it is and where the credentials
# live, never the credentials themselves. A runtime_env is stored in the GCS, shown on the dashboard and written
# to Ray's logs; keys reach each node through the standard AWS chain (its env, ~/.aws, the instance profile).
_STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE")


def _storage_env() -> dict[str, Any]:
    """Non-secret object-store settings the driver was given, so tasks on any node reach the same S3."""
    env = {k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _on_driver_node() -> dict[str, Any]:
    """Pin an actor to the driver's node: it then lives exactly as long as the job (a worker node may go away)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def run_download(cfg: Config) -> dict[str, Any]:
    """Every shard of the URL list (or, with download.retry_failed, of a retry round) committed or reported failed."""
    from pipeline.download import runs as download_runs

    dcfg = cfg.download
    output = cfg.path("images")
    files = download.expand_input(dcfg.input)
    fs, out = commit.fs_and_path(output)
    commit.claim_run(fs, out, "download", download.shard_settings(dcfg, files))  # refuses a changed config, first
    done = set(commit.committed_shards(fs, out))
    if fs.exists(f"{out}/_staging"):  # debris of attempts that died before publishing; never part of a shard
        fs.rm(f"{out}/_staging", recursive=True)
    plan_dir = f"{output.rstrip('/')}/_plan"
    plans, total = download.plan_shards(dcfg, files, done, plan_dir)
    if dcfg.retry_failed:
        if plans:
            raise RuntimeError(f"download.retry_failed: {len(plans)} shards of the URL list are not committed yet; "
                               "finish the run first (rerun without retry_failed)")
        plans = download_runs.plan_retry_round(output, plan_dir, dcfg.shard_size, total)
    log.info("download: %d shards to fetch, %d already committed", len(plans), len(done))
    registry = ShaRegistry.options(**_on_driver_node()).remote()
    if dcfg.dedup_images and done:
        ray.get(registry.claim.remote(download_runs.kept_images(output)))
    t0 = time.time()
    failed, run = _run_shards(cfg, output, plans, registry)
    seconds = time.time() - t0
    run.update(seconds=round(seconds, 3), images_per_s=round(run["successes"] / seconds, 2) if seconds > 0 else 0.0,
               retry_failed=dcfg.retry_failed)
    return download_runs.summarize(output, failed, run)


def _run_shards(cfg: Config, output: str, plans: list, registry) -> tuple[dict[int, str], dict[str, Any]]:
    """Every planned shard through :func:`run_bounded`; returns the failed shards and this run's totals."""
    dcfg = cfg.download
    fs, _ = commit.fs_and_path(output)
    progress = Progress("download", total=len(plans), unit="shards")
    task = _download_task.options(resources=dict(dcfg.resources), **_storage_env())
    totals = {"shards": 0, "rows": 0, "successes": 0, "bytes_downloaded": 0}
    failed: dict[int, str] = {}

    def done(plan, manifest: dict[str, Any]) -> None:
        totals["shards"] += 1
        totals["rows"] += manifest["count"]
        totals["successes"] += manifest["successes"]
        totals["bytes_downloaded"] += manifest["bytes_downloaded"]
        fs.rm(commit.fs_and_path(plan.arrow_path)[1])  # the plan is spent once its shard is committed
        progress.update(1, f"shard {plan.shard_id:05d}: {manifest['successes']}/{manifest['count']} ok")

    def gave_up(plan, error: str) -> None:
        failed[plan.shard_id] = error
        progress.update(1, f"shard {plan.shard_id:05d} FAILED")

    run_bounded(lambda plan, attempt: task.remote(dcfg, output, plan, attempt, registry), plans,
                dcfg.max_in_flight, dcfg.shard_retries, done, gave_up, name=lambda p: f"shard {p.shard_id:05d}")
    progress.close()
    return failed, totals


def run_bounded(submit, items, max_in_flight: int, retries: int, on_result, on_failure,
                name=str) -> dict[str, int]:
    """Run ``submit(item, attempt) -> ObjectRef`` over ``items`` (any iterable, read lazily) with at most
    ``max_in_flight`` refs outstanding: the driver holds O(max_in_flight) refs and results whatever the number of
    items, and hands each result to ``on_result(item, value)`` as it lands instead of keeping it. A failed item is
    resubmitted (``attempt`` + 1) up to ``retries`` times, then reported to ``on_failure(item, error)``; nothing is
    dropped. Returns counters: submitted, completed, failed, retried, peak_in_flight."""
    todo = iter(items)
    again: list[tuple[Any, int]] = []  # failed items waiting for another attempt go before fresh ones
    pending: dict[ray.ObjectRef, tuple[Any, int]] = {}
    stats = {"submitted": 0, "completed": 0, "failed": 0, "retried": 0, "peak_in_flight": 0}
    exhausted = False
    while True:
        while len(pending) < max_in_flight and (again or not exhausted):
            if again:
                item, attempt = again.pop()
            else:
                item = next(todo, _END)
                if item is _END:
                    exhausted = True
                    break
                attempt = 0
            pending[submit(item, attempt)] = (item, attempt)
            stats["submitted"] += 1
        if not pending:
            return stats
        stats["peak_in_flight"] = max(stats["peak_in_flight"], len(pending))
        refs = list(pending)
        ready, _ = ray.wait(refs, num_returns=1)
        if len(refs) > 1:  # drain everything else already finished: one wait per batch, not per task
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref, value, error in _results(ready):
            item, attempt = pending.pop(ref)
            if error is None:
                stats["completed"] += 1
                on_result(item, value)
            elif attempt < retries:
                log.warning("%s attempt %d failed (%s); retrying", name(item), attempt + 1, error)
                stats["retried"] += 1
                again.append((item, attempt + 1))
            else:
                stats["failed"] += 1
                on_failure(item, error)


_END = object()


def _results(refs: list) -> list[tuple[Any, Any, str | None]]:
    """(ref, value, error) for finished refs: one batched get, per-ref gets only when something in it failed."""
    try:
        return [(r, v, None) for r, v in zip(refs, ray.get(refs))]
    except Exception:  # noqa: BLE001 — find which ones failed; the others keep their values
        out = []
        for r in refs:
            try:
                out.append((r, ray.get(r), None))
            except Exception as exc:  # noqa: BLE001 — a failure is retried or reported by the caller
                out.append((r, None, f"{type(exc).__name__}: {exc}"))
        return out


def run_tokenize(cfg: Config, spec, encoder_threads: int = 1) -> dict[str, Any]:
    """Ray Data: committed image shards → decode (CPU tasks) → encoder actor pool → one token shard per image shard.

    The driver commits a shard when every one of its rows has come back (encoded or rejected), so a crash anywhere
    loses only uncommitted work, and a rerun redoes exactly the shards without a marker.
    """
    from pipeline.tokenize.encode import SHARD_ERROR, Encoder, decode_shard, write_token_shard

    images, tokens = cfg.path("tokens_input"), cfg.path("tokens")
    image_shards = shards.committed_image_shards(images)
    if not image_shards:
        raise FileNotFoundError(f"{images}: no committed image shards to tokenize")
    fs, out = commit.fs_and_path(tokens)
    settings = {"images": images, "spec": spec.__dict__}
    commit.claim_run(fs, out, "tokenize", settings)  # a changed model or preprocessing is refused before any write
    done = set(commit.committed_shards(fs, out))
    todo = {s: m["successes"] for s, m in image_shards.items() if s not in done}
    metadata = Encoder(spec).metadata()
    expected_rows = sum(todo.values())
    log.info("tokenize: %d shards (%d rows) to encode, %d already committed", len(todo), expected_rows, len(done))
    progress = Progress("tokenize", total=expected_rows, unit="rows")
    written: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for s in [s for s, n in todo.items() if n == 0]:  # a shard whose every URL failed gets an empty token shard
        written[f"{s:05d}"] = write_token_shard(tokens, s, _empty_rows(metadata), metadata, {}, 0.0)
    todo = {s: n for s, n in todo.items() if n > 0}
    if todo:
        size = cfg.download.image_size
        files = {s: image_shards[s].get("files", {}) for s in todo}
        ds = ray.data.from_items([{"shard_id": s, "expected": n} for s, n in todo.items()],
                                 override_num_blocks=len(todo))
        env = _storage_env()  # the S3 endpoint/region the driver was given reach every task and actor
        ds = ds.flat_map(lambda r: decode_shard(images, int(r["shard_id"]), size, int(r["expected"]),
                                                files[int(r["shard_id"])]), **env)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0  # encoder actors on GPUs when there are any
        ds = ds.map_batches(Encoder, fn_constructor_kwargs={"spec": spec, "threads": encoder_threads},
                            batch_size=cfg.tokenize.batch_size, concurrency=cfg.tokenize.num_encoders,
                            num_gpus=gpus, batch_format="numpy", **env)
        buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        rejects: dict[int, dict[str, str]] = defaultdict(dict)
        counts: dict[int, int] = defaultdict(int)
        seen: dict[int, set[str]] = defaultdict(set)
        started: dict[int, float] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for s in (int(x) for x in np.unique(batch["shard_id"])):
                sel = batch["shard_id"] == s
                started.setdefault(s, time.time())
                part = {k: v[sel] for k, v in batch.items()}
                if SHARD_ERROR in set(part["key"]):
                    failed[f"{s:05d}"] = str(part["reject"][list(part["key"]).index(SHARD_ERROR)])
                    log.error("tokenize: %s", failed[f"{s:05d}"])
                    progress.update(todo[s])
                    continue
                # A retried task (actor killed, node lost) may deliver rows twice: keep each key once.
                fresh = np.array([k not in seen[s] for k in part["key"]], dtype=bool)
                seen[s].update(str(k) for k in part["key"])
                part = {k: v[fresh] for k, v in part.items()}
                bad = part["reject"] != ""
                rejects[s].update({str(k): str(r) for k, r in zip(part["key"][bad], part["reject"][bad])})
                buffers[s].append({k: v[~bad] for k, v in part.items()})
                counts[s] += int(fresh.sum())
                progress.update(int(fresh.sum()))
                if counts[s] == todo[s] and f"{s:05d}" not in written:  # the shard is whole: commit, free its rows
                    parts = [p for p in buffers.pop(s) if len(p["key"])]
                    rows = _concat(parts) if parts else _empty_rows(metadata)
                    written[f"{s:05d}"] = write_token_shard(tokens, s, rows, metadata, rejects.pop(s),
                                                            time.time() - started[s])
        missing = {s: todo[s] - counts[s] for s in todo if f"{s:05d}" not in written and f"{s:05d}" not in failed}
        if missing:
            raise RuntimeError(f"tokenize: shards never completed (missing rows): {missing}")
    progress.close()
    n_rejects = sum(sum(m.get("rejects", {}).values()) for m in written.values())
    summary = {"shards_written": len(written), "shards_skipped": len(done), "shards_failed": failed,
               "rows_in": expected_rows, "rows": sum(m["rows"] for m in written.values()), "rejects": n_rejects,
               "seconds": progress.elapsed, "rows_per_s": expected_rows / max(progress.elapsed, 1e-9)}
    if written or failed or not fs.exists(f"{out}/_summary.json"):  # a rerun with nothing to do rewrites nothing
        commit.atomic_write(fs, f"{out}/_summary.json", json.dumps(summary, indent=1).encode())
    return summary


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


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every local path absolute: Ray Train workers (and tasks under a job's working_dir) run in their
    own folders."""
    import dataclasses

    def fix(v: str) -> str:
        return os.path.abspath(v) if v and "://" not in v else v

    rep = dataclasses.replace
    return rep(cfg, run_dir=fix(cfg.run_dir), download=rep(cfg.download, output=fix(cfg.download.output)),
               dvae=rep(cfg.dvae, output=fix(cfg.dvae.output)), clip=rep(cfg.clip, output=fix(cfg.clip.output)),
               tokenize=rep(cfg.tokenize, output=fix(cfg.tokenize.output)),
               prior=rep(cfg.prior, output=fix(cfg.prior.output)),
               sample=rep(cfg.sample, output=fix(cfg.sample.output), checkpoint=fix(cfg.sample.checkpoint)))


def run_train_prior(cfg: Config) -> None:
    """The prior on Ray Train: a ``TorchTrainer`` of ``prior.num_procs`` workers (GPUs when the cluster has them)
    running ``pipeline.prior.train.train`` on each rank with the same DeepSpeed engine as the deepspeed launcher."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.prior.num_procs
    job_cfg = absolute_paths(cfg)
    run_dir = job_cfg.run_dir

    def loop(_: dict[str, Any]) -> None:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is first imported in this worker
        from pipeline.prior.train import train
        from pipeline.runtime import ds_seam

        ds_seam.init_distributed()  # Ray Train already made the process group; DeepSpeed adopts it
        train(job_cfg, torch.distributed.get_rank(), torch.distributed.get_world_size())

    trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=cfg.prior.num_procs, use_gpu=use_gpu),
                           torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                           run_config=RunConfig(name="train-prior", storage_path=os.path.join(run_dir, "ray_train")))
    trainer.fit()


def run_sample(cfg: Config, captions: list[str]) -> tuple[list, dict[str, Any]]:
    """Captions split over ``sample.num_workers`` Ray actors (one GPU each when the cluster has enough), each loading
    the models once and drawing its share with seed ``sample.seed + share index``; results come back in caption
    order, with the rerank figures recomputed over all of them."""
    from pipeline.sample import core as sample_lib
    from pipeline.stages import draw_captions

    n = max(1, min(cfg.sample.num_workers, len(captions)))
    cfg = absolute_paths(cfg)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= n else 0
    bounds = np.linspace(0, len(captions), n + 1).astype(int)

    @ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus)
    def share(i: int) -> tuple[list, dict[str, Any]]:
        return draw_captions(cfg, captions[bounds[i]:bounds[i + 1]], cfg.sample.seed + i)

    parts = ray.get([share.options(**_storage_env()).remote(i) for i in range(n)])
    results = [r for part, _ in parts for r in part]
    stats: dict[str, Any] = {"workers": n, "gpus_per_worker": gpus, "checkpoint": parts[0][1]["checkpoint"]}
    for key in ("captions", "samples", "empty_captions", "truncated_captions"):
        stats[key] = sum(int(p[1].get(key, 0)) for p in parts)
    stats["generate_s"] = max(float(p[1].get("generate_s", 0.0)) for p in parts)  # the shares run side by side
    stats.update(sample_lib.rerank_stats(results))
    return results, stats


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
