"""The run report: report.md with sample grids, dVAE reconstructions, loss curves and per-stage figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the report is written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from pipeline.sample.core import CaptionSamples  # noqa: E402

CELL = 96  # displayed pixels per image


def _cell(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img).resize((CELL, CELL), Image.NEAREST)


def sample_grid(results: list[CaptionSamples], path: str, per_row: int = 6) -> None:
    """One row per caption: the caption, then the CLIP-reranked samples (best first, outlined)."""
    font = ImageFont.load_default()
    label_w, pad = 330, 4
    k = min(per_row, len(results[0].candidates))
    grid = Image.new("RGB", (label_w + k * (CELL + pad), len(results) * (CELL + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, res in enumerate(results):
        y = r * (CELL + pad)
        words = res.caption.split(" on a ")
        draw.text((4, y + CELL // 2 - 12), words[0], fill=(0, 0, 0), font=font)
        if len(words) > 1:
            draw.text((4, y + CELL // 2 + 2), "on a " + words[1], fill=(0, 0, 0), font=font)
        for c in range(k):
            x = label_w + c * (CELL + pad)
            grid.paste(_cell(res.candidates[c]), (x, y))
            if c == 0:
                draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], outline=(0, 200, 0), width=3)
    grid.save(path)


def recon_grid(originals: np.ndarray, recons: np.ndarray, path: str) -> None:
    """Top row originals, bottom row their dVAE reconstructions (encode → codes → decode)."""
    n = len(originals)
    grid = Image.new("RGB", (n * (CELL + 4), 2 * (CELL + 4)), (255, 255, 255))
    for i in range(n):
        grid.paste(_cell(originals[i]), (i * (CELL + 4), 0))
        grid.paste(_cell(recons[i]), (i * (CELL + 4), CELL + 4))
    grid.save(path)


def loss_curves(curves: dict[str, list[tuple[int, float]]], path: str) -> None:
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6))
    axes = np.atleast_1d(axes)
    for ax, (name, pts) in zip(axes, curves.items()):
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_markdown(folder: str, stages: dict[str, dict[str, Any]], scores: dict[str, float],
                   figures: dict[str, str], diffusion: dict[str, Any] | None = None) -> str:
    lines = ["# Run report", "", "## Caption faithfulness (read from pixels of the CLIP-reranked samples)", "",
             "| measure | value | chance |", "|---|---|---|",
             f"| shape colour matches caption | {scores['match']:.3f} | {scores['chance']:.3f} |",
             f"| position matches caption | {scores['position_match']:.3f} | {scores['position_chance']:.3f} |",
             f"| colour and position | {scores['colour_and_position_match']:.3f} | "
             f"{scores['chance'] * scores['position_chance']:.3f} |",
             f"| colour, all candidates before rerank | {scores['match_before_rerank']:.3f} | "
             f"{scores['chance']:.3f} |", ""]
    if diffusion is not None:
        lines += _diffusion_section(diffusion)
    lines += ["## Stages", "", "| stage | wall s | figures |", "|---|---|---|"]
    for name, st in stages.items():
        figs = ", ".join(f"{k}={_fmt(v)}" for k, v in st.items() if k != "wall_s" and not isinstance(v, (list, dict)))
        lines.append(f"| {name} | {st.get('wall_s', 0):.1f} | {figs} |")
    lines.append("")
    for title, fname in figures.items():
        lines += [f"## {title}", "", f"![{title}]({fname})", ""]
    path = Path(folder) / "report.md"
    path.write_text("\n".join(lines))
    (Path(folder) / "report.json").write_text(json.dumps({"stages": stages, "scores": scores}, indent=1,
                                                         default=str))
    return str(path)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _diffusion_section(ev: dict[str, Any]) -> list[str]:
    """DALL-E 2 prior on held-out rows: how close its predicted image embedding lands to the true one."""
    k = ev.get("k", 5)
    un = ev.get("cos_uncond_image")
    return ["## Diffusion prior (held-out rows)", "",
            f"{ev['evaluated']} held-out rows, never trained on; retrieval over {ev['index_rows']} dataset images.", "",
            "| measure | predicted image emb | text emb (baseline) | unconditional |", "|---|---|---|---|",
            f"| cosine to the true image embedding | {ev['cos_pred_image']:.3f} | {ev['cos_text_image']:.3f} | "
            f"{'' if un is None else f'{un:.3f}'} |",
            f"| true image is the nearest (recall@1) | {ev['recall_at_1']:.3f} | {ev['text_recall_at_1']:.3f} | "
            f"{_fmt(ev.get('uncond_recall_at_1', ''))} |",
            f"| true image among {k} nearest | {ev['recall_at_k']:.3f} | {ev['text_recall_at_k']:.3f} | "
            f"{_fmt(ev.get('uncond_recall_at_k', ''))} |", ""]
