"""The demo's DALL-E 2 part, after the diffusion prior: train a tiny decoder on the same engine, evaluate it on
held-out rows, run the DALL-E 2 chain (caption → CLIP text emb → diffusion prior → image emb → decoder → CLIP rerank)
on the held-out captions, and draw variations of a few dataset images. Every output goes to the run's storage."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import Config
from pipeline.report.figures import variations_grid
from pipeline.storage.urls import Workspace, join

Stage = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any]]
VARIATION_INPUTS = 4


def with_chain(cfg: Config, chain: str, output: str, **sample: Any) -> Config:
    return dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, chain=chain, output=output, **sample))


def variation_inputs(images: np.ndarray, n: int) -> list[int]:
    """Indices of ``n`` distinct-looking dataset images (the embedded set repeats renders): first of each."""
    seen: set[bytes] = set()
    out: list[int] = []
    for i, img in enumerate(images):
        if img.tobytes() not in seen:
            seen.add(img.tobytes())
            out.append(i)
        if len(out) == n:
            break
    return out


def run_dalle2(cfg: Config, stage: Stage, images: np.ndarray) -> dict[str, Any]:
    """The stages train-decoder, eval-decoder, sample-dalle2 and variations; returns the DALL-E 2 samples drawn and
    where the variations grid is."""
    from pipeline.decoder import train as decoder_train
    from pipeline.decoder.eval import eval_decoder_summary
    from pipeline.sample.run import run_sample

    stage("train-decoder", lambda: decoder_train.launch(cfg))
    stage("eval-decoder", lambda: eval_decoder_summary(cfg))
    report = cfg.path("report")
    drawn: list = []

    def sample_dalle2() -> dict[str, Any]:
        summary, results = run_sample(with_chain(cfg, "dalle2", join(report, "dalle2")))
        drawn.extend(results)
        return summary

    stage("sample-dalle2", sample_dalle2)
    ws = Workspace(join(report, "variations"), role="variations")  # the inputs are files: written here, then pushed
    picks = variation_inputs(images, VARIATION_INPUTS)
    paths = []
    for i in picks:
        paths.append(ws.at(f"input{i:05d}.png"))
        Image.fromarray(images[i]).save(paths[-1])
    ws.push(*(f"input{i:05d}.png" for i in picks))
    grid = join(report, "variations", "variations.png")

    def variations() -> dict[str, Any]:
        summary, results = run_sample(with_chain(cfg, "variations", join(report, "variations"), variations=paths))
        summary["variations_png"] = variations_grid([images[i] for i in picks], results, grid)
        return summary

    stage("variations", variations)
    return {"drawn": drawn, "variations_png": grid}
