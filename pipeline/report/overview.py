"""The parts of the run report people look at first: a row of headline figures per stage, each stage's throughput,
a grid of downloaded images with their captions, how the dVAE's codebook is used over the token shards, and how the
rows' CLIP similarity is spread. Every figure shown here is also in ``report.json`` (with the full per-stage figures),
so a test or a dashboard reads the same numbers the page shows.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from pipeline.storage import commit, shards

# The figures worth a glance, per stage (the first of these a summary has; the rest stay in report.json).
HEADLINES = ("successes", "failed", "rows", "rejected", "images", "train_images", "final_loss", "heldout_mse",
             "heldout_psnr", "perplexity", "codes_used", "retrieval_top1_64", "match", "chance", "recall_at_1",
             "cos_pred_image", "scored", "evaluated", "steps")
MAX_HEADLINES = 4
# What a stage processed, for its throughput: the first of these its summary has.
COUNTS = (("successes", "images downloaded"), ("rows", "rows tokenized"), ("train_images", "images trained on"),
          ("samples", "images drawn"), ("evaluated", "rows evaluated"), ("scored", "captions scored"))
CELL, LABEL_H = 96, 52


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def headlines(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A few numbers per stage: those of ``HEADLINES`` it has (up to ``MAX_HEADLINES``), else its first numbers."""
    out = {}
    for name, figures in stages.items():
        picked = {k: figures[k] for k in HEADLINES if _number(figures.get(k))}
        if not picked:
            picked = {k: v for k, v in figures.items() if k != "wall_s" and _number(v)}
        out[name] = dict(list(picked.items())[:MAX_HEADLINES])
    return out


def throughput(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage: its wall time, and what it processed per second where its summary counts something."""
    out = {}
    for name, figures in stages.items():
        wall = figures.get("wall_s")
        if not _number(wall):
            continue
        row: dict[str, Any] = {"wall_s": float(wall)}
        for key, what in COUNTS:
            if _number(figures.get(key)):
                row.update(count=figures[key], what=what, per_s=figures[key] / max(float(wall), 1e-9))
                break
        out[name] = row
    return out


def image_grid(images_folder: str, path: str, n: int = 12, per_row: int = 6) -> dict[str, Any]:
    """The first ``n`` downloaded images of the committed shards, each over its caption, as a PNG; returns the keys
    and captions shown (what the page's grid is made of)."""
    picked: list[dict[str, Any]] = []
    for shard_id in shards.committed_image_shards(images_folder):
        picked += [s for s in shards.read_shard_samples(images_folder, shard_id) if s["image"]][:n - len(picked)]
        if len(picked) >= n:
            break
    if not picked:
        return {"keys": [], "captions": []}
    font = ImageFont.load_default()
    cols = min(per_row, len(picked))
    rows = -(-len(picked) // cols)
    grid = Image.new("RGB", (cols * (CELL + 4), rows * (CELL + LABEL_H + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, s in enumerate(picked):
        x, y = (i % cols) * (CELL + 4), (i // cols) * (CELL + LABEL_H + 4)
        img = Image.open(io.BytesIO(s["image"])).convert("RGB").resize((CELL, CELL), Image.BICUBIC)
        grid.paste(img, (x, y))
        for j, line in enumerate(textwrap.wrap(s["caption"], 17)[:4]):
            draw.text((x + 2, y + CELL + 2 + 12 * j), line, fill=(0, 0, 0), font=font)
    with commit.atomic_output(path) as f:
        grid.save(f, format="PNG")
    return {"keys": [s["key"] for s in picked], "captions": [s["caption"] for s in picked]}


def token_histograms(tokens_folder: str, vocab_size: int, out_dir: str) -> dict[str, Any]:
    """Over every committed token shard: how often each dVAE code occurs (``codebook.counts``, one per code) and the
    rows' CLIP similarity in 20 bins (``clip_similarity``), each drawn as a PNG in ``out_dir``."""
    fs, folder = commit.fs_and_path(tokens_folder)
    codes = np.zeros(vocab_size, dtype=np.int64)
    sims: list[np.ndarray] = []
    for sid, marker in commit.committed_shards(fs, folder).items():
        with fs.open(commit.shard_file(folder, sid, ".parquet", marker), "rb") as f:
            table = pq.read_table(f, columns=["image_tokens", "clip_similarity"])
        if "image_tokens" in table.column_names and table.num_rows:
            flat = table.column("image_tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            codes += np.bincount(flat.astype(np.int64), minlength=vocab_size)[:vocab_size]
        sims.append(table.column("clip_similarity").to_numpy(zero_copy_only=False).astype(np.float64))
    sim = np.concatenate(sims) if sims else np.zeros(0)
    counts, edges = np.histogram(sim, bins=20, range=(min(-1.0, sim.min(initial=0)), 1.0)) if sim.size else \
        (np.zeros(20, dtype=np.int64), np.linspace(-1, 1, 21))
    _bars(np.sort(codes)[::-1], "dVAE codes, most used first", "tokens", f"{out_dir}/codebook_usage.png",
          f"codebook usage: {int((codes > 0).sum())} of {vocab_size} codes used, {int(codes.sum())} tokens")
    _bars(counts, "CLIP similarity (caption ↔ image)", "rows", f"{out_dir}/clip_similarity.png",
          f"CLIP similarity of {sim.size} rows", edges)
    return {"codebook": {"vocab_size": vocab_size, "tokens": int(codes.sum()), "codes_used": int((codes > 0).sum()),
                         "counts": codes.tolist()},
            "clip_similarity": {"rows": int(sim.size), "edges": [round(float(e), 4) for e in edges],
                                "counts": counts.tolist(),
                                "mean": float(sim.mean()) if sim.size else None}}


def _bars(values: np.ndarray, xlabel: str, ylabel: str, path: str, title: str, edges: np.ndarray | None = None
          ) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if edges is None:
        ax.bar(np.arange(len(values)), values, width=1.0)
    else:
        ax.bar(edges[:-1], values, width=np.diff(edges), align="edge", edgecolor="white")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.tight_layout()
    with commit.atomic_output(path) as f:
        fig.savefig(f, format="png")


def markdown(stages: dict[str, dict[str, Any]], heads: dict[str, dict[str, Any]],
             rates: dict[str, dict[str, Any]]) -> list[str]:
    """The stage table (a few headline figures per stage; the rest in report.json) and the throughput table."""
    lines = ["## Stages", "", "Headline figures; every figure of every stage is in `report.json`.", "",
             "| stage | wall s | headline figures |", "|---|---:|---|"]
    for name in stages:
        figs = " · ".join(f"**{k}** {_fmt(v)}" for k, v in heads.get(name, {}).items())
        lines.append(f"| {name} | {stages[name].get('wall_s', 0):.1f} | {figs} |")
    lines += ["", "## Throughput", "", "| stage | processed | per second |", "|---|---:|---:|"]
    for name, r in rates.items():
        done = f"{_fmt(r['count'])} {r['what']}" if "count" in r else ""
        lines.append(f"| {name} | {done} | {_fmt(r['per_s']) if 'per_s' in r else ''} |")
    return lines + [""]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
