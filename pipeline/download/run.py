"""The download stage as a run: the URL list planned into shards, every shard fetched by a task on the cluster
(``pipeline.runtime.ray_seam`` distributes them), committed or reported failed, and the run summarised.

Stage logic only; the seam runs whatever callable it is given, so this module never imports ray.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import Config
from pipeline.download import planner, runs
from pipeline.download.owners import ShaOwners
from pipeline.download.shard import ShardPlan, download_shard
from pipeline.errors import RunMismatchError
from pipeline.forget import record
from pipeline.runtime import ray_seam
from pipeline.runtime.progress import Progress
from pipeline.storage import commit
from pipeline.storage.lease import Lease

log = logging.getLogger(__name__)


def run_download(cfg: Config) -> dict[str, Any]:
    """Every shard of the URL list (or, with download.retry_failed, of a retry round) committed or reported failed,
    under the output folder's lease (a second run into the same folder is refused)."""
    dcfg = cfg.download
    output = cfg.path("images")
    files = planner.expand_input(dcfg.input)
    fs, out = commit.fs_and_path(output)
    with Lease(output, "download") as lease:
        commit.claim_run(fs, out, "download", planner.shard_settings(dcfg, files))  # refuses a changed config
        commit.clear_debris(fs, out, ("_staging", "_plan"))  # of dead runs: no live run but ours can be writing here
        done = set(commit.committed_shards(fs, out))
        plan_dir = commit.join(output, "_plan", lease.id)  # this run's own: no other run can delete it
        try:
            return _run(cfg, output, files, done, plan_dir, lease)
        finally:  # this run's plans and any staging its tasks left: every task of the run has ended by now
            commit.clear_debris(fs, out, ("_staging", "_plan"))


def _run(cfg: Config, output: str, files: list[str], done: set[int], plan_dir: str, lease: Lease) -> dict[str, Any]:
    dcfg = cfg.download
    plans, total = planner.plan_shards(dcfg, files, done, plan_dir)
    if dcfg.retry_failed:
        if plans:
            raise RunMismatchError(f"download.retry_failed: {len(plans)} shards of the URL list are not committed yet; "
                             "finish the run first (rerun without retry_failed)")
        plans = runs.plan_retry_round(output, dcfg.shard_size, total, dcfg.save_additional_columns)
    log.info("download: %d shards to fetch, %d already committed", len(plans), len(done))
    registry = ray_seam.driver_actor(ShaOwners)
    if dcfg.dedup_images and done:
        registry.claim(runs.kept_images(output))
    t0 = time.time()
    failed: dict[int, str] = {}
    run: dict[str, Any] = {"shards": 0, "rows": 0, "successes": 0, "bytes_downloaded": 0}
    try:
        _run_shards(cfg, output, plans, registry, lease, failed, run)
    except BaseException as exc:  # the summary still says what was committed and what failed, then the error
        run["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        seconds = time.time() - t0
        run.update(seconds=round(seconds, 3), retry_failed=dcfg.retry_failed,
                   images_per_s=round(run["successes"] / seconds, 2) if seconds > 0 else 0.0)
        summary = runs.summarize(output, failed, run)
    return summary


def _run_shards(cfg: Config, output: str, plans: list[ShardPlan], registry: Any, lease: Lease,
                failed: dict[int, str], totals: dict[str, Any]) -> None:
    """Every planned shard through the seam's bounded distributor, into ``failed`` and this run's ``totals``."""
    dcfg = cfg.download
    fs, _ = commit.fs_and_path(output)
    progress = Progress("download", total=len(plans), unit="shards")
    fetch_shard = ray_seam.task(download_shard, num_cpus=dcfg.task_cpus, resources=dcfg.resources)

    def done(plan: ShardPlan, manifest: dict[str, Any]) -> None:
        totals["shards"] += 1
        totals["rows"] += manifest["count"]
        totals["successes"] += manifest["successes"]
        totals["bytes_downloaded"] += manifest["bytes_downloaded"]
        commit.remove(fs, commit.fs_and_path(plan.arrow_path)[1])  # the plan is spent once its shard is committed
        progress.update(1, f"shard {plan.shard_id:05d}: {manifest['successes']}/{manifest['count']} ok")

    def gave_up(plan: ShardPlan, error: str) -> None:
        failed[plan.shard_id] = error
        progress.update(1, f"shard {plan.shard_id:05d} FAILED")

    token = lease.token
    refuse = record.refusals(cfg.path("takedowns")) or None  # what the run's takedowns removed is never fetched again
    ray_seam.run_bounded(lambda plan, attempt: fetch_shard(dcfg, output, plan, attempt, registry.claim, token,
                                                           refuse),
                         plans, dcfg.max_in_flight, dcfg.shard_retries, done, gave_up,
                         name=lambda p: f"shard {p.shard_id:05d}")
    progress.close()
