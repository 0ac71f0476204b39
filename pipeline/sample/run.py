"""The sample stage as a run: the captions to draw (``sample.captions``, files of captions, or the run's held-out
captions), the models loaded and checked, the drawing done in this process or spread over ``sample.num_workers``
workers through the Ray seam, and the records written (``pipeline.sample.records``)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.clip import model as clip_lib
from pipeline.config import Config, absolute_paths
from pipeline.dvae.model import load_dvae
from pipeline.errors import NotFoundError
from pipeline.report import figures
from pipeline.sample.draw import CaptionSamples, draw, rerank_stats
from pipeline.sample.models import check_models, load_sampler_prior
from pipeline.sample.records import faithfulness, write_samples

log = logging.getLogger(__name__)


def resolve_captions(entries: list[str], fallback: Callable[[], list[str]], limit: int) -> list[str]:
    """The captions to draw: each entry naming an existing file adds its non-empty lines, any other entry is a caption
    itself (an empty string samples unconditionally). No captions at all → ``fallback()`` (the held-out captions),
    cut to ``limit``; captions given explicitly are all drawn."""
    out: list[str] = []
    for entry in entries:
        if entry and os.path.isfile(entry):
            with open(entry, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            found = [line for line in lines if line]
            log.info("sample: %d captions from %s", len(found), entry)
            if not found:
                log.warning("sample: caption file %s has no non-empty lines", entry)
            out += found
            continue
        if entry.endswith((".txt", ".csv", ".tsv")) or os.sep in entry:
            log.warning("sample: caption %r looks like a path but no such file exists; drawing it as a caption",
                        entry)
        out.append(entry)
    if not out:
        out = list(fallback())[:limit]
    return out


def heldout_captions(cfg: Config) -> list[str]:
    path = Path(cfg.run_dir) / "dataset.json"
    if not path.exists():
        raise NotFoundError(f"{path}: no embedded-dataset record; give sample.captions explicitly")
    return json.loads(path.read_text())["heldout_captions"]


def sample_captions(cfg: Config) -> list[str]:
    """``sample.captions`` (entries naming a file add its lines), else the run's held-out captions."""
    return resolve_captions(cfg.sample.captions, lambda: heldout_captions(cfg), cfg.sample.num_captions)


def _sampler_dvae_path(cfg: Config, meta: dict[str, Any]) -> str:
    """The dVAE the prior's tokens came from (tokens_meta), else the run's own."""
    recorded = (meta.get("dvae") or {}).get("path")
    if recorded and os.path.isfile(recorded):
        return recorded
    return os.path.join(cfg.path("dvae"), "dvae.pt")


def draw_captions(cfg: Config, captions: list[str], seed: int) -> tuple[list[CaptionSamples], dict[str, Any]]:
    """Load the prior (``sample.checkpoint``), dVAE and CLIP, check they agree, and draw ``captions``: the work one
    process (or one worker of ``sample.num_workers``) does."""
    sc = cfg.sample
    prior, meta, source = load_sampler_prior(cfg)
    dvae = load_dvae(_sampler_dvae_path(cfg, meta))
    clip_meta = meta.get("clip") or {}
    if clip_meta.get("arch"):
        bundle = clip_lib.load_clip(clip_meta["arch"], clip_meta.get("pretrained") or "")
    else:
        bundle = clip_lib.load_clip(clip_lib.clip_arch(cfg), cfg.clip.pretrained)
    image_size = int((meta.get("preprocess") or {}).get("image_size") or cfg.download.image_size)
    check_models(prior, source, dvae, getattr(bundle.tokenizer, "tokenizer", bundle.tokenizer), image_size)
    if torch.cuda.is_available():  # a GPU worker: sample there
        prior, dvae = prior.cuda(), dvae.cuda()
    torch.manual_seed(seed)
    results, stats = draw(prior, dvae, bundle, captions, sc.candidates, sc.temperature, sc.top_k, seed,
                          guidance_scale=sc.guidance_scale, top_p=sc.top_p, keep=sc.keep)
    stats["checkpoint"] = source
    return results, stats


def draw_on_workers(cfg: Config, captions: list[str]) -> tuple[list[CaptionSamples], dict[str, Any]]:
    """Captions split over ``sample.num_workers`` workers (one GPU each when the cluster has enough), each loading
    the models once and drawing its share with seed ``sample.seed + share index``; results come back in caption
    order, with the rerank figures recomputed over all of them."""
    from pipeline.runtime import ray_seam

    ray_seam.init_ray(cfg)
    n = max(1, min(cfg.sample.num_workers, len(captions)))
    cfg = absolute_paths(cfg)
    gpus = 1 if ray_seam.cluster_gpus() >= n else 0
    bounds = np.linspace(0, len(captions), n + 1).astype(int)
    shares = [(cfg, captions[bounds[i]:bounds[i + 1]], cfg.sample.seed + i) for i in range(n)]
    parts = ray_seam.run_on_workers(draw_captions, shares, num_cpus=0 if gpus else 1, num_gpus=gpus)
    results = [r for part, _ in parts for r in part]
    stats: dict[str, Any] = {"workers": n, "gpus_per_worker": gpus, "checkpoint": parts[0][1]["checkpoint"]}
    for key in ("captions", "samples", "empty_captions", "truncated_captions"):
        stats[key] = sum(int(p[1].get(key, 0)) for p in parts)
    stats["generate_s"] = max(float(p[1].get("generate_s", 0.0)) for p in parts)  # the shares run side by side
    stats.update(rerank_stats(results))
    return results, stats


def run_sample(cfg: Config) -> tuple[dict[str, Any], list[CaptionSamples]]:
    """Draw images for ``sample.captions`` (default: the held-out captions) with the prior of ``sample.checkpoint``,
    in this process or spread over ``sample.num_workers`` workers; write the combined grid samples.png, per-caption
    grids and PNGs under samples/, and samples.parquet/json."""
    t0 = time.time()
    sc = cfg.sample
    captions = sample_captions(cfg)
    results, stats = draw_on_workers(cfg, captions) if sc.num_workers > 1 else draw_captions(cfg, captions, sc.seed)
    out = Path(cfg.path("report"))
    out.mkdir(parents=True, exist_ok=True)
    figures.sample_grid(results, str(out / "samples.png"))
    settings = {"seed": sc.seed, "temperature": sc.temperature, "top_k": sc.top_k, "top_p": sc.top_p,
                "guidance_scale": sc.guidance_scale, "checkpoint": stats["checkpoint"]}
    stats.update(write_samples(results, str(out), settings))
    try:
        stats.update(faithfulness(results))
    except ValueError as exc:  # captions from outside the embedded dataset cannot be scored from pixels
        stats["faithfulness"] = str(exc)
    stats["wall_s"] = round(time.time() - t0, 2)
    return stats, results
