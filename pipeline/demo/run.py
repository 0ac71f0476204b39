"""The whole pipeline on the embedded default dataset, served over loopback HTTP, ending in a report."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import stages
from pipeline.config import Config
from pipeline.demo import synth
from pipeline.demo.server import ImageServer

log = logging.getLogger(__name__)


def prepare_dataset(cfg: Config, server: ImageServer, samples: list[synth.Sample],
                    heldout: list[str]) -> str:
    """Write the URL list (Parquet: url, caption) and the dataset record; return the list's path."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    urls = run / "urls.parquet"
    table = pa.table({"url": [server.url(s.index) for s in samples], "caption": [s.caption for s in samples]})
    pq.write_table(table, urls)
    (run / "dataset.json").write_text(json.dumps({"num_images": len(samples), "heldout_captions": heldout,
                                                  "heldout_fraction": cfg.data.heldout_fraction}, indent=1))
    return str(urls)


def _print_stage(name: str, summary: dict[str, Any]) -> None:
    figs = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()
            if not isinstance(v, (list, dict))}
    print(f"[demo] stage {name} done in {summary.get('wall_s', 0):.1f}s: {figs}", flush=True)


def run_demo(cfg: Config) -> dict[str, Any]:
    from pipeline.runtime import ray_seam

    t_all = time.time()
    summaries: dict[str, dict[str, Any]] = {}
    samples, heldout = synth.make_samples(cfg.data.num_images, cfg.data.heldout_fraction, cfg.seed)
    pngs = {s.index: synth.render_png(s, cfg.data.render_size) for s in samples}
    with ImageServer(pngs) as server:
        urls = prepare_dataset(cfg, server, samples, heldout)
        if not cfg.download.input:
            cfg.download.input = urls
        # The SSRF guard stays on; only this loopback server's own address:port is let through.
        host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
        cfg.download.allowed_addresses = [*cfg.download.allowed_addresses, f"{host}:{port}"]
        print(f"[demo] serving {len(pngs)} images at {server.base_url}; URL list {urls}", flush=True)
        summaries["download"] = stages.download(cfg)
        summaries["download"]["http_requests"] = server.requests
    _print_stage("download", summaries["download"])

    images, keys, captions = stages.load_images(cfg)
    summaries["train-dvae"] = stages.train_dvae(cfg, images)
    _print_stage("train-dvae", summaries["train-dvae"])
    summaries["train-clip"] = stages.train_clip(cfg, images, captions)
    _print_stage("train-clip", summaries["train-clip"])
    summaries["tokenize"] = stages.tokenize(cfg)
    _print_stage("tokenize", summaries["tokenize"])
    ray_seam.shutdown()  # give the cores back before the DeepSpeed ranks start
    summaries["train-prior"] = stages.train_prior(cfg)
    _print_stage("train-prior", summaries["train-prior"])
    summaries["sample"], results = stages.sample(cfg)
    _print_stage("sample", summaries["sample"])
    dcfg = stages.diffusion_config(cfg)  # DALL-E 2's prior: same tokens, same engine
    summaries["train-diffusion-prior"] = stages.train_prior(dcfg)
    _print_stage("train-diffusion-prior", summaries["train-diffusion-prior"])
    summaries["eval-prior"] = stages.eval_prior(dcfg)
    _print_stage("eval-prior", summaries["eval-prior"])
    report_path = write_report(cfg, summaries, results, images)
    summaries["total"] = {"wall_s": round(time.time() - t_all, 2)}
    return {"report": report_path, "stages": summaries, "match": summaries["sample"]["match"],
            "chance": summaries["sample"]["chance"]}


def write_report(cfg: Config, summaries: dict[str, dict[str, Any]], results: list, images: np.ndarray) -> str:
    import torch

    from pipeline.dvae.model import load_dvae
    from pipeline.report import figures as report

    out = Path(cfg.path("report"))
    out.mkdir(parents=True, exist_ok=True)
    dvae = load_dvae(str(Path(cfg.path("dvae")) / "dvae.pt"))
    probe = images[:12]
    with torch.no_grad():
        x = torch.from_numpy(probe).permute(0, 3, 1, 2).float() / 255.0
        rec = (dvae.decode(dvae.encode(x)).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    report.recon_grid(probe, rec, str(out / "dvae_reconstructions.png"))
    dvae_hist = json.loads((Path(cfg.path("dvae")) / "metrics.json").read_text())["history"]
    curves = {"dVAE (recon + KL)": [(h["step"], h["loss"]) for h in dvae_hist]}
    clip_metrics = Path(cfg.path("clip")) / "metrics.json"
    if clip_metrics.exists():
        curves["CLIP (contrastive)"] = list(enumerate(json.loads(clip_metrics.read_text())["losses"], 1))
    prior_lines = (Path(cfg.path("prior")) / "metrics.jsonl").read_text().splitlines()
    curves["prior (image-token CE, DeepSpeed)"] = [(r["step"], r["loss"]) for r in map(json.loads, prior_lines)]
    diffusion = Path(cfg.path("prior_diffusion"))
    if (diffusion / "metrics.jsonl").exists():
        curves["diffusion prior (x0 MSE, DeepSpeed)"] = [
            (r["step"], r["loss"]) for r in map(json.loads, (diffusion / "metrics.jsonl").read_text().splitlines())]
    report.loss_curves(curves, str(out / "loss_curves.png"))
    figures = {"Samples for held-out captions (CLIP-reranked, best outlined)": "samples.png",
               "dVAE reconstructions (top: downloaded, bottom: decoded from tokens)": "dvae_reconstructions.png",
               "Loss curves": "loss_curves.png"}
    diffusion_eval = diffusion / "eval" / "eval.json"
    if diffusion_eval.exists():
        shutil.copy(diffusion / "eval" / "retrieval.png", out / "diffusion_retrieval.png")
        figures["Diffusion prior: nearest dataset images to the predicted CLIP image embedding (held-out captions, "
                "true image outlined)"] = "diffusion_retrieval.png"
    md = report.write_markdown(str(out), summaries, summaries["sample"], figures,
                               json.loads(diffusion_eval.read_text()) if diffusion_eval.exists() else None)
    from pipeline.report.html import write_html

    write_html(str(out))  # report.html: the same report with every image inlined, one file to share
    return md
