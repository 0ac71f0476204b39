"""One function per stage: ``Config`` in, summary dict out. The CLI and jobs/ call these and nothing else."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import Config, to_dict

log = logging.getLogger(__name__)


def _stamp(summary: dict[str, Any], t0: float) -> dict[str, Any]:
    summary["wall_s"] = round(time.time() - t0, 2)
    return summary


def download(cfg: Config) -> dict[str, Any]:
    from pipeline.runtime import ray_seam

    t0 = time.time()
    ray_seam.init_ray(cfg)
    summary = ray_seam.run_download(cfg)
    if summary["shards_failed"]:
        log.error("download: %d shards failed after retries: %s", len(summary["shards_failed"]),
                  summary["shards_failed"])
    return _stamp(summary, t0)


def load_images(cfg: Config, limit: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    from pipeline.dvae.data import load_image_array

    return load_image_array(cfg.path("images"), cfg.download.image_size, limit)


def train_dvae(cfg: Config, images: np.ndarray | None = None) -> dict[str, Any]:
    """Run ``pipeline.dvae.train`` on ``dvae.num_procs`` ranks through the deepspeed launcher; it streams the
    committed image shards itself (``images`` is not used)."""
    t0 = time.time()
    if cfg.dvae.weights:  # OpenAI's published dVAE, or a checkpoint of ours: no training, same output layout
        from pipeline.dvae.openai import import_weights

        return _stamp(import_weights(cfg), t0)
    from pipeline.runtime import ds_seam

    out = Path(cfg.path("dvae"))
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "config.yaml"
    resolved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log.info("train-dvae: %d ranks through the deepspeed launcher; log %s", cfg.dvae.num_procs, out / "launcher.log")
    ds_seam.launch("pipeline.dvae.train", str(resolved), cfg.dvae.num_procs, str(out / "launcher.log"), "[train-dvae]")
    if not (out / "metrics.json").exists():  # stopped early (dvae.stop_after_steps): resumable, no weights yet
        lines = (out / "metrics.jsonl").read_text().splitlines()
        last = [r for r in map(json.loads, lines) if r.get("kind") == "train"][-1:]
        return _stamp({"stopped_after_step": last[0]["step"] if last else 0, "steps": cfg.dvae.steps,
                       "loss": last[0]["loss"] if last else None, "checkpoint": ds_seam.latest_complete(str(out))},
                      t0)
    return _stamp(json.loads((out / "metrics.json").read_text())["result"], t0)


def clip_arch(cfg: Config) -> str:
    return cfg.clip.model or f"local-dir:{os.path.abspath(cfg.path('clip'))}"


def train_clip(cfg: Config, images: np.ndarray | None = None, captions: list[str] | None = None) -> dict[str, Any]:
    from pipeline.clip import model as clip_lib

    t0 = time.time()
    if cfg.clip.model:
        return _stamp({"skipped": f"using open_clip model {cfg.clip.model}"}, t0)
    if images is None or captions is None:
        images, _, captions = load_images(cfg)
    result = clip_lib.train_clip(cfg.clip, images, captions, cfg.path("clip"), cfg.seed)
    losses = result.pop("losses")
    Path(cfg.path("clip"), "metrics.json").write_text(json.dumps({"losses": losses}))
    bundle = clip_lib.load_clip(clip_arch(cfg))
    uniq: dict[str, int] = {}
    for i, c in enumerate(captions):
        uniq.setdefault(c, i)
    pick = list(uniq.values())[:64]
    result["retrieval_top1_64"] = clip_lib.retrieval_accuracy(bundle, images[pick], [captions[i] for i in pick])
    return _stamp(result, t0)


def encoder_spec(cfg: Config):
    from pipeline.tokenize.encode import EncoderSpec

    return EncoderSpec(dvae_path=os.path.abspath(os.path.join(cfg.path("dvae"), "dvae.pt")),
                       clip_arch=clip_arch(cfg), clip_pretrained=cfg.clip.pretrained,
                       image_size=cfg.download.image_size)


def tokenize(cfg: Config) -> dict[str, Any]:
    from pipeline.runtime import ray_seam

    t0 = time.time()
    if cfg.dvae.weights and not Path(cfg.path("dvae"), "dvae.pt").exists():  # e.g. OpenAI's: import it first
        from pipeline.dvae.openai import import_weights

        import_weights(cfg)
    ray_seam.init_ray(cfg)
    return _stamp(ray_seam.run_tokenize(cfg, encoder_spec(cfg)), t0)


def train_prior(cfg: Config) -> dict[str, Any]:
    """Run ``pipeline.prior.train`` on ``prior.num_procs`` ranks through the deepspeed launcher."""

    t0 = time.time()
    out = Path(cfg.path("prior"))
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "config.yaml"
    resolved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if cfg.prior.launcher == "ray":  # Ray Train's TorchTrainer runs the same per-rank function on its workers
        from pipeline.runtime import ray_seam

        ray_seam.init_ray(cfg)
        ray_seam.run_train_prior(cfg)
        return _prior_summary(cfg, out, t0)
    from pipeline.runtime import ds_seam

    ds_seam.launch("pipeline.prior.train", str(resolved), cfg.prior.num_procs, str(out / "launcher.log"),
                   "[train-prior]")
    return _prior_summary(cfg, out, t0)


def diffusion_config(cfg: Config) -> Config:
    """``cfg`` with its ``diffusion`` section as the prior to train/evaluate (output <run_dir>/prior_diffusion)."""
    section = dataclasses.replace(cfg.diffusion, kind="diffusion", output=cfg.path("prior_diffusion"))
    return dataclasses.replace(cfg, prior=section)


def eval_prior(cfg: Config) -> dict[str, Any]:
    from pipeline.prior.eval import eval_prior as run

    t0 = time.time()
    result = run(cfg, limit=cfg.prior.eval_rows)
    return _stamp({k: v for k, v in result.items() if k.startswith(("cos_", "recall", "text_recall", "uncond_recall"))
                   or k in ("beats_text_baseline", "evaluated", "index_rows", "chance_recall_at_k")}, t0)


def _prior_summary(cfg: Config, out: Path, t0: float) -> dict[str, Any]:
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return _stamp({"ranks": cfg.prior.num_procs, "zero_stage": cfg.prior.zero_stage, "steps": cfg.prior.steps,
                   "launcher": cfg.prior.launcher, "first_loss": metrics[0]["loss"],
                   "final_loss": metrics[-1]["loss"], "samples_per_s": metrics[-1]["samples_per_s"]}, t0)


def heldout_captions(cfg: Config) -> list[str]:
    path = Path(cfg.run_dir) / "dataset.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no embedded-dataset record; give sample.captions explicitly")
    return json.loads(path.read_text())["heldout_captions"]


def sample_captions(cfg: Config) -> list[str]:
    """``sample.captions`` (entries naming a file add its lines), else the run's held-out captions."""
    from pipeline.sample import core as sample_lib

    return sample_lib.resolve_captions(cfg.sample.captions, lambda: heldout_captions(cfg), cfg.sample.num_captions)


def load_sampler_prior(cfg: Config):
    """(prior, tokens_meta, source model.pt) for ``sample.checkpoint``; see
    ``pipeline.sample.core.load_sampler_prior``."""
    from pipeline.sample import core as sample_lib

    return sample_lib.load_sampler_prior(cfg)


def _sampler_dvae_path(cfg: Config, meta: dict[str, Any]) -> str:
    """The dVAE the prior's tokens came from (tokens_meta), else the run's own."""
    recorded = (meta.get("dvae") or {}).get("path")
    if recorded and os.path.isfile(recorded):
        return recorded
    return os.path.join(cfg.path("dvae"), "dvae.pt")


def draw_captions(cfg: Config, captions: list[str], seed: int) -> tuple[list, dict[str, Any]]:
    """Load the prior (``sample.checkpoint``), dVAE and CLIP, check they agree, and draw ``captions``: the work one
    process (or one Ray actor of ``sample.num_workers``) does."""
    import torch

    from pipeline.clip import model as clip_lib
    from pipeline.dvae.model import load_dvae
    from pipeline.sample import core as sample_lib

    sc = cfg.sample
    prior, meta, source = load_sampler_prior(cfg)
    dvae = load_dvae(_sampler_dvae_path(cfg, meta))
    clip_meta = meta.get("clip") or {}
    if clip_meta.get("arch"):
        bundle = clip_lib.load_clip(clip_meta["arch"], clip_meta.get("pretrained") or "")
    else:
        bundle = clip_lib.load_clip(clip_arch(cfg), cfg.clip.pretrained)
    image_size = int((meta.get("preprocess") or {}).get("image_size") or cfg.download.image_size)
    sample_lib.check_models(prior, source, dvae, getattr(bundle.tokenizer, "tokenizer", bundle.tokenizer),
                            image_size)
    if torch.cuda.is_available():  # a GPU actor: sample there
        prior, dvae = prior.cuda(), dvae.cuda()
    torch.manual_seed(seed)
    results, stats = sample_lib.draw(prior, dvae, bundle, captions, sc.candidates, sc.temperature, sc.top_k,
                                     seed, guidance_scale=sc.guidance_scale, top_p=sc.top_p, keep=sc.keep)
    stats["checkpoint"] = source
    return results, stats


def sample(cfg: Config) -> tuple[dict[str, Any], list]:
    """Draw images for ``sample.captions`` (default: the held-out captions) with the prior of ``sample.checkpoint``,
    in this process or spread over ``sample.num_workers`` Ray actors; write the combined grid samples.png,
    per-caption grids and PNGs under samples/, and samples.parquet/json."""
    from pipeline.report import figures as report
    from pipeline.sample import core as sample_lib

    t0 = time.time()
    sc = cfg.sample
    captions = sample_captions(cfg)
    if sc.num_workers > 1:
        from pipeline.runtime import ray_seam

        ray_seam.init_ray(cfg)
        results, stats = ray_seam.run_sample(cfg, captions)
    else:
        results, stats = draw_captions(cfg, captions, sc.seed)
    out = Path(cfg.path("report"))
    out.mkdir(parents=True, exist_ok=True)
    report.sample_grid(results, str(out / "samples.png"))
    settings = {"seed": sc.seed, "temperature": sc.temperature, "top_k": sc.top_k, "top_p": sc.top_p,
                "guidance_scale": sc.guidance_scale, "checkpoint": stats["checkpoint"]}
    stats.update(sample_lib.write_samples(results, str(out), settings))
    try:
        stats.update(sample_lib.faithfulness(results))
    except ValueError as exc:  # captions from outside the embedded dataset cannot be scored from pixels
        stats["faithfulness"] = str(exc)
    return _stamp(stats, t0), results
