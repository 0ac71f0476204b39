"""The whole pipeline on the embedded default dataset, served over loopback HTTP, ending in a report: DALL-E 1
(dVAE, autoregressive prior, sampling) and DALL-E 2 (diffusion prior, decoder, the chain and variations)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, diffusion_config
from pipeline.demo import synth
from pipeline.demo.dalle2 import run_dalle2
from pipeline.demo.server import ImageServer
from pipeline.dvae.data import load_image_array
from pipeline.report.build import write_run_report
from pipeline.runtime.progress import timed
from pipeline.sample.run import run_sample
from pipeline.storage.commit import atomic_output
from pipeline.storage.urls import join, write_json
from pipeline.training.tracking import require_wandb

log = logging.getLogger(__name__)


def prepare_dataset(cfg: Config, server: ImageServer, samples: list[synth.Sample],
                    heldout: list[str]) -> str:
    """Write the URL list (Parquet: url, caption) and the dataset record; return the list's path."""
    urls = join(cfg.run_dir, "urls.parquet")  # a folder or the run's storage (a URL)
    table = pa.table({"url": [server.url(s.index) for s in samples], "caption": [s.caption for s in samples]})
    with atomic_output(urls) as f:
        pq.write_table(table, f)
    write_json(join(cfg.run_dir, "dataset.json"), {"num_images": len(samples), "heldout_captions": heldout,
                                                    "heldout_fraction": cfg.data.heldout_fraction})
    return urls


def _print_stage(name: str, summary: dict[str, Any]) -> None:
    figs = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()
            if not isinstance(v, (list, dict))}
    print(f"[demo] stage {name} done in {summary.get('wall_s', 0):.1f}s: {figs}", flush=True)


def run_demo(cfg: Config) -> dict[str, Any]:
    """Every stage on the embedded dataset (served by a loopback HTTP server for the download), then the report."""
    from pipeline.clip.train import run_train_clip
    from pipeline.download.run import run_download
    from pipeline.dvae import train as dvae_train
    from pipeline.dvae.openai import import_weights
    from pipeline.prior import train as prior_train
    from pipeline.prior.eval import eval_prior_summary
    from pipeline.runtime import ray_seam
    from pipeline.tokenize.encode import encoder_spec
    from pipeline.tokenize.run import run_tokenize

    require_wandb(cfg.logging.wandb)  # set without the package: refused before any work
    t_all = time.time()
    summaries: dict[str, dict[str, Any]] = {}

    def stage(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        summaries[name] = timed(fn)
        _print_stage(name, summaries[name])
        return summaries[name]

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
        ray_seam.init_ray(cfg)
        stage("download", lambda: {**run_download(cfg), "http_requests": server.requests})
    images, keys, captions = load_image_array(cfg.path("images"), cfg.download.image_size)
    stage("train-dvae", lambda: import_weights(cfg) if cfg.dvae.weights else dvae_train.launch(cfg))
    stage("train-clip", lambda: run_train_clip(cfg, images, captions))
    stage("tokenize", lambda: run_tokenize(cfg, encoder_spec(cfg)))
    ray_seam.shutdown()  # give the cores back before the DeepSpeed ranks start
    stage("train-prior", lambda: prior_train.launch(cfg))
    drawn: list = []
    stage("sample", lambda: _keep(run_sample(cfg), drawn))  # the report shows the samples themselves too
    dcfg = diffusion_config(cfg)  # DALL-E 2's prior: same tokens, same engine
    stage("train-diffusion-prior", lambda: prior_train.launch(dcfg))
    stage("eval-prior", lambda: eval_prior_summary(dcfg))
    run_dalle2(cfg, stage, images)  # DALL-E 2: decoder trained, evaluated, chained after the prior; variations
    report_path = write_run_report(cfg, summaries, drawn, images)
    summaries["total"] = {"wall_s": round(time.time() - t_all, 2)}
    _track(cfg, summaries)
    d1, d2 = summaries["sample"], summaries["sample-dalle2"]
    return {"report": report_path, "stages": summaries, "match": d1["match"], "chance": d1["chance"],
            "dalle2_match": d2["match"], "dalle2_chance": d2["chance"]}


def _track(cfg: Config, summaries: dict[str, dict[str, Any]]) -> None:
    """With ``logging.wandb`` set, a ``demo`` W&B run beside the trainers' own: every stage's headline numbers as its
    summary (``<stage>/<figure>``) and the report's PNGs (samples, reconstructions, loss curves) as images."""
    from pipeline.config import to_dict
    from pipeline.storage.urls import Workspace, local_copy
    from pipeline.training import tracking

    run = tracking.open_run(cfg.logging.wandb, "demo", cfg.run_dir, Workspace(cfg.path("report"), role="wandb").local,
                            to_dict(cfg))
    if run is None:
        return
    run.summary({f"{stage}/{k}": v for stage, figures in summaries.items() for k, v in figures.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    folder = local_copy(cfg.path("report"))
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png"):
            run.image(f"report/{name.removesuffix('.png')}", os.path.join(folder, name), 0)
    run.finish()


def _keep(summary_and_results: tuple[dict[str, Any], list], into: list) -> dict[str, Any]:
    summary, results = summary_and_results
    into.extend(results)
    return summary
