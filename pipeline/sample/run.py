"""The sample stage as a run: the captions to draw (``sample.captions``, files of captions, or the run's held-out
captions), the models loaded and checked, the drawing done in this process or spread over ``sample.num_workers``
workers through the Ray seam, and the records written (``pipeline.sample.records``)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, absolute_paths
from pipeline.dvae.model import load_dvae
from pipeline.errors import NotFoundError
from pipeline.report import figures
from pipeline.runtime.devices import worker_device
from pipeline.sample.draw import CaptionSamples, draw, rerank_stats
from pipeline.sample.models import check_models, load_run_clip, load_sampler_prior
from pipeline.sample.records import faithfulness, write_samples
from pipeline.storage.urls import Workspace, exists, join, read_json
from pipeline.storage.weights import DVAE_FILE

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
    path = join(cfg.run_dir, "dataset.json")
    if not exists(path):
        raise NotFoundError(f"{path}: no embedded-dataset record; give sample.captions explicitly")
    return read_json(path)["heldout_captions"]


def sample_captions(cfg: Config) -> list[str]:
    """``sample.captions`` (entries naming a file add its lines), else the run's held-out captions."""
    return resolve_captions(cfg.sample.captions, lambda: heldout_captions(cfg), cfg.sample.num_captions)


def _sampler_dvae_path(cfg: Config, meta: dict[str, Any]) -> str:
    """The dVAE the prior's tokens came from (tokens_meta), else the run's own."""
    recorded = (meta.get("dvae") or {}).get("path")
    if recorded and exists(recorded):
        return recorded
    return join(cfg.path("dvae"), DVAE_FILE)


def draw_captions(cfg: Config, captions: list[str], seed: int) -> tuple[list[CaptionSamples], dict[str, Any]]:
    """Load the prior (``sample.checkpoint``), dVAE and CLIP, check they agree, and draw ``captions``: the work one
    process (or one worker of ``sample.num_workers``) does."""
    sc = cfg.sample
    prior, meta, source = load_sampler_prior(cfg)
    dvae = load_dvae(_sampler_dvae_path(cfg, meta))
    bundle = load_run_clip(cfg, meta)
    image_size = int((meta.get("preprocess") or {}).get("image_size") or cfg.download.image_size)
    check_models(prior, source, dvae, getattr(bundle.tokenizer, "tokenizer", bundle.tokenizer), image_size)
    device = worker_device("sample", sc.gpus_per_worker, sc.require_gpu)
    prior, dvae = prior.to(device), dvae.to(device)
    torch.manual_seed(seed)
    results, stats = draw(prior, dvae, bundle, captions, sc.candidates, sc.temperature, sc.top_k, seed,
                          guidance_scale=sc.guidance_scale, top_p=sc.top_p, keep=sc.keep)
    stats["checkpoint"], stats["device"] = source, device.type
    return results, stats


Drawer = Callable[[Config, list[str], int], tuple[list[CaptionSamples], dict[str, Any]]]


def draw_on_workers(cfg: Config, captions: list[str],
                    drawer: Drawer = draw_captions) -> tuple[list[CaptionSamples], dict[str, Any]]:
    """Captions (or variation inputs) split over ``sample.num_workers`` workers (one GPU each when the cluster has
    enough), each loading the models once and drawing its share with ``drawer`` and seed ``sample.seed + share
    index``; results come back in input order, with the rerank figures recomputed over all of them."""
    from pipeline.runtime import ray_seam

    ray_seam.init_ray(cfg)
    n = max(1, min(cfg.sample.num_workers, len(captions)))
    request = cfg.sample.request()
    ray_seam.check_demand(cfg, f"sample.num_workers={n} workers of sample.cpus_per_worker / gpus_per_worker / "
                          "resources", request, n)
    cfg = absolute_paths(cfg)
    bounds = np.linspace(0, len(captions), n + 1).astype(int)
    shares = [(cfg, captions[bounds[i]:bounds[i + 1]], cfg.sample.seed + i) for i in range(n)]
    parts = ray_seam.run_on_workers(drawer, shares, request)
    results = [r for part, _ in parts for r in part]
    stats: dict[str, Any] = {"workers": n, "gpus_per_worker": cfg.sample.gpus_per_worker,
                             "devices": sorted({str(p[1].get("device", "")) for p in parts}),
                             "checkpoint": parts[0][1]["checkpoint"],
                             "record_settings": parts[0][1].get("record_settings", {})}
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
    drawer: Drawer = draw_captions
    if sc.chain == "dalle1":
        captions = sample_captions(cfg)
    else:  # DALL-E 2: the diffusion prior and the decoder, or variations of images
        from pipeline.decoder import sampling

        drawer, captions = sampling.chain(cfg, sample_captions)
    results, stats = draw_on_workers(cfg, captions, drawer) if sc.num_workers > 1 else drawer(cfg, captions, sc.seed)
    ws = Workspace(cfg.path("report"), role="sample")  # written here, then put in the run's storage
    out = Path(ws.local)
    figures.sample_grid(results, str(out / "samples.png"))
    settings = {"seed": sc.seed, "temperature": sc.temperature, "top_k": sc.top_k, "top_p": sc.top_p,
                "guidance_scale": sc.guidance_scale, "checkpoint": stats["checkpoint"],
                **stats.pop("record_settings", {})}  # the DALL-E 2 chains' own (decoder checkpoint, steps, ...)
    stats.update(write_samples(results, str(out), settings))
    try:
        stats.update(faithfulness(results))
    except ValueError as exc:  # captions from outside the embedded dataset cannot be scored from pixels
        stats["faithfulness"] = str(exc)
    ws.push("samples.png", "samples", "samples.parquet", "samples.json")
    stats["wall_s"] = round(time.time() - t0, 2)
    return stats, results
