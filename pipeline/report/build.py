"""The run report from what the stages left in the run folder: sample grids, dVAE reconstructions, loss curves,
per-stage figures, the diffusion prior's section, as ``report.md`` and a self-contained ``report.html``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.dvae.model import load_dvae
from pipeline.report import figures as figures_lib
from pipeline.report.html import write_html
from pipeline.report.markdown import write_markdown
from pipeline.training.metrics import read_metrics


def write_run_report(cfg: Config, summaries: dict[str, dict[str, Any]], results: list, images: np.ndarray) -> str:
    """``report.md`` (and ``report.html``) under ``<run>/report``; ``images`` are downloaded images for the dVAE
    reconstruction strip. Returns the markdown's path."""
    out = Path(cfg.path("report"))
    out.mkdir(parents=True, exist_ok=True)
    dvae = load_dvae(str(Path(cfg.path("dvae")) / "dvae.pt"))
    probe = images[:12]
    with torch.no_grad():
        x = torch.from_numpy(probe).permute(0, 3, 1, 2).float() / 255.0
        rec = (dvae.decode(dvae.encode(x)).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    figures_lib.recon_grid(probe, rec, str(out / "dvae_reconstructions.png"))
    dvae_hist = json.loads((Path(cfg.path("dvae")) / "metrics.json").read_text())["history"]
    curves = {"dVAE (recon + KL)": [(h["step"], h["loss"]) for h in dvae_hist]}
    clip_metrics = Path(cfg.path("clip")) / "metrics.json"
    if clip_metrics.exists():
        curves["CLIP (contrastive)"] = list(enumerate(json.loads(clip_metrics.read_text())["losses"], 1))
    curves["prior (image-token CE, DeepSpeed)"] = [(r["step"], r["loss"]) for r in read_metrics(cfg.path("prior"))]
    diffusion = Path(cfg.path("prior_diffusion"))
    if (diffusion / "metrics.jsonl").exists():
        curves["diffusion prior (x0 MSE, DeepSpeed)"] = [(r["step"], r["loss"]) for r in read_metrics(str(diffusion))]
    figures_lib.loss_curves(curves, str(out / "loss_curves.png"))
    figures = {"Samples for held-out captions (CLIP-reranked, best outlined)": "samples.png",
               "dVAE reconstructions (top: downloaded, bottom: decoded from tokens)": "dvae_reconstructions.png",
               "Loss curves": "loss_curves.png"}
    diffusion_eval = diffusion / "eval" / "eval.json"
    if diffusion_eval.exists():
        shutil.copy(diffusion / "eval" / "retrieval.png", out / "diffusion_retrieval.png")
        figures["Diffusion prior: nearest dataset images to the predicted CLIP image embedding (held-out captions, "
                "true image outlined)"] = "diffusion_retrieval.png"
    md = write_markdown(str(out), summaries, summaries["sample"], figures,
                               json.loads(diffusion_eval.read_text()) if diffusion_eval.exists() else None)
    write_html(str(out))  # report.html: the same report with every image inlined, one file to share
    return md
