"""The report's pictures: the sample grid, dVAE reconstructions and loss curves, as PNG files."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: the report is written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from pipeline.sample.draw import CaptionSamples  # noqa: E402

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


def variations_grid(inputs: list[np.ndarray], results: list[CaptionSamples], path: str, per_row: int = 6) -> str:
    """One row per input image: the input (outlined blue), a gap, then its variations best first. Written atomically
    (a local path or the run's storage)."""
    from pipeline.storage.commit import atomic_output

    pad, gap = 4, 16
    k = min(per_row, max(len(r.candidates) for r in results))
    grid = Image.new("RGB", (pad + CELL + gap + k * (CELL + pad), len(results) * (CELL + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (src, res) in enumerate(zip(inputs, results, strict=True)):
        y = pad + r * (CELL + pad)
        grid.paste(_cell(src), (pad, y))
        draw.rectangle([pad, y, pad + CELL - 1, y + CELL - 1], outline=(40, 90, 230), width=3)
        for c, img in enumerate(res.candidates[:k]):
            grid.paste(_cell(img), (pad + CELL + gap + c * (CELL + pad), y))
    with atomic_output(path) as f:
        grid.save(f, format="PNG")
    return path
