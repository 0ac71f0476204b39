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
from pipeline.download.shard import ShardPlan, download_shard
from pipeline.errors import InputError
from pipeline.runtime import ray_seam
from pipeline.runtime.progress import Progress
from pipeline.storage import commit

log = logging.getLogger(__name__)


class ShaOwners:
    """Run-wide first owner of each image sha256 (the duplicate-image filter). Seeded from committed shards on resume.

    The download runs it as one actor on the driver's node, so losing a worker node never loses it. It holds every
    kept image's sha prefix; at LAION scale (10^8 images) that is a few GB, so shard it by prefix when you get there.
    """

    def __init__(self) -> None:
        self.owner: dict[int, str] = {}

    def claim(self, pairs: list[tuple[str, str]]) -> dict[str, str]:
        return {sha: self.owner.setdefault(int(sha[:16], 16), key) for sha, key in pairs}


def run_download(cfg: Config) -> dict[str, Any]:
    """Every shard of the URL list (or, with download.retry_failed, of a retry round) committed or reported failed."""
    dcfg = cfg.download
    output = cfg.path("images")
    files = planner.expand_input(dcfg.input)
    fs, out = commit.fs_and_path(output)
    commit.claim_run(fs, out, "download", planner.shard_settings(dcfg, files))  # refuses a changed config, first
    done = set(commit.committed_shards(fs, out))
    if fs.exists(f"{out}/_staging"):  # debris of attempts that died before publishing; never part of a shard
        fs.rm(f"{out}/_staging", recursive=True)
    plan_dir = commit.join(output, "_plan")
    plans, total = planner.plan_shards(dcfg, files, done, plan_dir)
    if dcfg.retry_failed:
        if plans:
            raise InputError(f"download.retry_failed: {len(plans)} shards of the URL list are not committed yet; "
                               "finish the run first (rerun without retry_failed)")
        plans = runs.plan_retry_round(output, plan_dir, dcfg.shard_size, total)
    log.info("download: %d shards to fetch, %d already committed", len(plans), len(done))
    registry = ray_seam.driver_actor(ShaOwners)
    if dcfg.dedup_images and done:
        registry.claim(runs.kept_images(output))
    t0 = time.time()
    failed, run = _run_shards(cfg, output, plans, registry)
    seconds = time.time() - t0
    run.update(seconds=round(seconds, 3), images_per_s=round(run["successes"] / seconds, 2) if seconds > 0 else 0.0,
               retry_failed=dcfg.retry_failed)
    return runs.summarize(output, failed, run)


def _run_shards(cfg: Config, output: str, plans: list[ShardPlan],
                registry: Any) -> tuple[dict[int, str], dict[str, Any]]:
    """Every planned shard through the seam's bounded distributor; the failed shards and this run's totals."""
    dcfg = cfg.download
    fs, _ = commit.fs_and_path(output)
    progress = Progress("download", total=len(plans), unit="shards")
    fetch_shard = ray_seam.task(download_shard, num_cpus=1, resources=dcfg.resources)
    totals = {"shards": 0, "rows": 0, "successes": 0, "bytes_downloaded": 0}
    failed: dict[int, str] = {}

    def done(plan: ShardPlan, manifest: dict[str, Any]) -> None:
        totals["shards"] += 1
        totals["rows"] += manifest["count"]
        totals["successes"] += manifest["successes"]
        totals["bytes_downloaded"] += manifest["bytes_downloaded"]
        fs.rm(commit.fs_and_path(plan.arrow_path)[1])  # the plan is spent once its shard is committed
        progress.update(1, f"shard {plan.shard_id:05d}: {manifest['successes']}/{manifest['count']} ok")

    def gave_up(plan: ShardPlan, error: str) -> None:
        failed[plan.shard_id] = error
        progress.update(1, f"shard {plan.shard_id:05d} FAILED")

    ray_seam.run_bounded(lambda plan, attempt: fetch_shard(dcfg, output, plan, attempt, registry.claim), plans,
                         dcfg.max_in_flight, dcfg.shard_retries, done, gave_up,
                         name=lambda p: f"shard {p.shard_id:05d}")
    progress.close()
    return failed, totals
