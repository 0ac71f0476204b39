"""The run report from what the stages left in the run folder: sample grids, dVAE reconstructions, loss curves,
per-stage figures, the diffusion prior's section, as ``report.md`` and a self-contained ``report.html``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.dvae.model import load_dvae
from pipeline.errors import NotFoundError
from pipeline.report import figures as figures_lib
from pipeline.report import overview
from pipeline.report.html import write_html
from pipeline.report.markdown import write_markdown
from pipeline.report.summaries import SUMMARIES, read_summaries
from pipeline.storage.urls import Workspace, exists, join, local_copy, read_json
from pipeline.storage.weights import DVAE_FILE
from pipeline.training.metrics import read_metrics


def write_run_report(cfg: Config, summaries: dict[str, dict[str, Any]], results: list, images: np.ndarray) -> str:
    """``report.md`` (and ``report.html``) under ``<run>/report`` (a folder or the run's storage); ``images`` are
    downloaded images for the dVAE reconstruction strip. Returns the markdown's location."""
    ws = Workspace(cfg.path("report"), role="report")  # composed here, then put in the run's storage
    # The sample stages' grids, inlined into report.html (DALL-E 2's when the run has them).
    ws.pull("samples.png", "dalle2/samples.png", "variations/variations.png")
    out = Path(ws.local)
    dvae = load_dvae(join(cfg.path("dvae"), DVAE_FILE))
    probe = images[:12]
    with torch.no_grad():
        x = torch.from_numpy(probe).permute(0, 3, 1, 2).float() / 255.0
        rec = (dvae.decode(dvae.encode(x)).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    figures_lib.recon_grid(probe, rec, str(out / "dvae_reconstructions.png"))
    dvae_hist = read_json(join(cfg.path("dvae"), "metrics.json"))["history"]
    curves = {"dVAE (recon + KL)": [(h["step"], h["loss"]) for h in dvae_hist]}
    clip_metrics = join(cfg.path("clip"), "metrics.json")
    if exists(clip_metrics):
        curves["CLIP (contrastive)"] = list(enumerate(read_json(clip_metrics)["losses"], 1))
    curves["prior (image-token CE, DeepSpeed)"] = [(r["step"], r["loss"]) for r in read_metrics(cfg.path("prior"))]
    diffusion = cfg.path("prior_diffusion")
    if exists(join(diffusion, "metrics.jsonl")):
        curves["diffusion prior (x0 MSE, DeepSpeed)"] = [(r["step"], r["loss"]) for r in read_metrics(diffusion)]
    decoder = cfg.path("decoder")
    if exists(join(decoder, "metrics.jsonl")):
        curves["decoder (v/ε MSE, DeepSpeed)"] = [(r["step"], r["loss"]) for r in read_metrics(decoder)]
    figures_lib.loss_curves(curves, str(out / "loss_curves.png"))
    shown = overview.image_grid(cfg.path("images"), str(out / "dataset_grid.png"))
    facts = {"headlines": overview.headlines(summaries), "throughput": overview.throughput(summaries),
             "dataset_grid": shown,
             **overview.token_histograms(cfg.path("tokens"), dvae.shape.vocab_size, str(out))}
    figures = {f"Downloaded images and their captions (the first {len(shown['keys'])})": "dataset_grid.png",
               "Samples for held-out captions (CLIP-reranked, best outlined)": "samples.png",
               "dVAE reconstructions (top: downloaded, bottom: decoded from tokens)": "dvae_reconstructions.png",
               "dVAE codebook usage over the token shards": "codebook_usage.png",
               "CLIP similarity of caption and image over the token shards": "clip_similarity.png",
               "Loss curves": "loss_curves.png"}
    diffusion_eval = join(diffusion, "eval", "eval.json")
    evaluation = read_json(diffusion_eval) if exists(diffusion_eval) else None
    if evaluation is not None:
        shutil.copy(local_copy(join(diffusion, "eval", "retrieval.png")), out / "diffusion_retrieval.png")
        figures["Diffusion prior: nearest dataset images to the predicted CLIP image embedding (held-out captions, "
                "true image outlined)"] = "diffusion_retrieval.png"
    dalle2 = _dalle2(cfg, summaries, out, figures)
    write_markdown(str(out), summaries, summaries["sample"], figures, evaluation, dalle2, facts)
    write_html(str(out))  # report.html: the same report with every image inlined, one file to share
    ws.push("report.md", "report.json", "report.html", "dvae_reconstructions.png", "loss_curves.png",
            "dataset_grid.png", "codebook_usage.png", "clip_similarity.png",
            "diffusion_retrieval.png", "decoder_reconstructions.png")
    return ws.url_of("report.md")


def _dalle2(cfg: Config, summaries: dict[str, dict[str, Any]], out: Path,
            figures: dict[str, str]) -> dict[str, Any] | None:
    """The DALL-E 2 section's figures (the chain's samples, the decoder's evaluation, variations), or None when the
    run has neither DALL-E 2 samples nor a decoder evaluation; adds its pictures to ``figures``."""
    ev_path = join(cfg.path("decoder"), "eval", "eval.json")
    evaluation = read_json(ev_path) if exists(ev_path) else None
    samples = summaries.get("sample-dalle2")
    if evaluation is None and samples is None:
        return None
    if (out / "dalle2" / "samples.png").exists():
        figures["DALL-E 2: held-out captions → diffusion prior → decoder (CLIP-reranked, best outlined)"] = \
            "dalle2/samples.png"
    if evaluation is not None:
        shutil.copy(local_copy(join(cfg.path("decoder"), "eval", "reconstructions.png")),
                    out / "decoder_reconstructions.png")
        figures["Decoder on held-out rows: original, decoded from its CLIP image embedding, decoded from the "
                "prior's embedding of its caption"] = "decoder_reconstructions.png"
    if (out / "variations" / "variations.png").exists():
        figures["Variations: a dataset image (outlined) → its CLIP image embedding → the decoder"] = \
            "variations/variations.png"
    return {"samples": samples, "eval": evaluation}


def run_report(cfg: Config) -> dict[str, Any]:
    """The report of a run whose stages ran as separate commands (Ray jobs), from what they left in its storage."""
    from pipeline.dvae.data import load_image_array

    summaries = read_summaries(cfg)
    if "sample" not in summaries:
        raise NotFoundError(f"{join(cfg.run_dir, SUMMARIES)}: no sample summary; run sample (into this run_dir) "
                            "before report")
    images, _, _ = load_image_array(cfg.path("images"), cfg.download.image_size, limit=12)
    md = write_run_report(cfg, summaries, [], images)
    return {"report": md, "html": md.removesuffix(".md") + ".html", "stages": sorted(summaries)}
