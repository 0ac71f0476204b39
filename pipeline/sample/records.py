"""What sampling leaves to look at: per-caption grids and per-candidate PNGs, ``samples.parquet``/``.json`` with
one row per candidate, and the faithfulness of the kept samples read back from their pixels (embedded dataset)."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

from pipeline.demo import synth
from pipeline.sample.draw import CaptionSamples

log = logging.getLogger(__name__)


CELL = 96  # displayed pixels per image in the per-caption grids
SETTINGS = ("seed", "temperature", "top_k", "top_p", "guidance_scale")


def write_samples(results: list[CaptionSamples], out_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Per caption ``idx``: ``samples/<idx:03d>.png``, every candidate best first labelled with its CLIP score (kept
    ones outlined green), and ``samples/<idx:03d>/<rank>.png`` each candidate at its own resolution. One row per
    candidate in ``samples.parquet`` and ``samples.json``: caption, caption_index, rank, kept, clip_score,
    draw_index, the sampling ``settings`` (seed, temperature, top_k, top_p, guidance_scale, and any other key given)
    and image_path (relative to ``out_dir``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    missing = [k for k in SETTINGS if k not in settings]
    if missing:
        raise ValueError(f"write_samples: settings lack {missing}")
    out = Path(out_dir)
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for idx, r in enumerate(results):
        sub = folder / f"{idx:03d}"
        sub.mkdir(exist_ok=True)
        for rank, img in enumerate(r.candidates):
            rel = f"samples/{idx:03d}/{rank}.png"
            Image.fromarray(img).save(out / rel)
            rows.append({"caption": r.caption, "caption_index": idx, "rank": rank, "kept": rank < r.keep,
                         "clip_score": float(r.clip_scores[rank]),
                         "draw_index": int(r.draw_index[rank]) if r.draw_index is not None else rank,
                         **{k: settings[k] for k in SETTINGS},
                         **{k: v for k, v in settings.items() if k not in SETTINGS},
                         "image_path": rel})
        caption_grid(r, str(folder / f"{idx:03d}.png"))
    fields = [("caption", pa.string()), ("caption_index", pa.int32()), ("rank", pa.int32()), ("kept", pa.bool_()),
              ("clip_score", pa.float32()), ("draw_index", pa.int32()), ("seed", pa.int64()),
              ("temperature", pa.float32()), ("top_k", pa.int32()), ("top_p", pa.float32()),
              ("guidance_scale", pa.float32())]
    known = {name for name, _ in fields}
    extra = [k for k in (rows[0] if rows else {}) if k not in known and k != "image_path"]
    schema = pa.schema(fields + [(k, pa.string()) for k in extra] + [("image_path", pa.string())])
    table = pa.Table.from_pylist([{**row, **{k: str(row[k]) for k in extra}} for row in rows], schema=schema)
    pq.write_table(table, out / "samples.parquet")
    (out / "samples.json").write_text(json.dumps(rows, indent=1))
    return {"samples_parquet": str(out / "samples.parquet"), "samples_json": str(out / "samples.json"),
            "sample_grids": len(results), "sample_images": len(rows),
            "kept_images": sum(row["kept"] for row in rows)}


def caption_grid(r: CaptionSamples, path: str, per_row: int = 8) -> None:
    """The caption on top, then every candidate best first, each labelled with its rank and CLIP score."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, label_h, head_h = 4, 14, 18
    k = len(r.candidates)
    cols = max(1, min(per_row, k))
    rows = (k + cols - 1) // cols
    width = max(cols * (CELL + pad) + pad, 240)
    chars = max(20, width // 6)
    head = textwrap.wrap(r.caption, chars) or ["(empty caption: unconditional)"]
    top = pad + head_h * len(head)
    grid = Image.new("RGB", (width, top + rows * (CELL + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(head):
        draw.text((pad, pad + i * head_h), line, fill=(0, 0, 0), font=font)
    for rank, img in enumerate(r.candidates):
        x = pad + (rank % cols) * (CELL + pad)
        y = top + (rank // cols) * (CELL + label_h + pad)
        grid.paste(Image.fromarray(img).resize((CELL, CELL), Image.NEAREST), (x, y))
        kept = rank < r.keep
        if kept:
            draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], outline=(0, 200, 0), width=3)
        draw.text((x, y + CELL + 1), f"#{rank} {float(r.clip_scores[rank]):.3f}{' kept' if kept else ''}",
                  fill=(0, 120, 0) if kept else (0, 0, 0), font=font)
    grid.save(path)


def faithfulness(results: list[CaptionSamples]) -> dict[str, float]:
    """How often the reranked sample shows the caption's colour / position, read back from pixels, vs chance."""
    colour = position = both = n = 0
    colour_any = 0
    for r in results:
        attrs = synth.parse_caption(r.caption)
        if attrs is None:
            continue
        n += 1
        got_colour, got_pos = synth.read_attributes(r.candidates[0])
        colour += got_colour == attrs["colour"]
        position += got_pos == attrs["position"]
        both += got_colour == attrs["colour"] and got_pos == attrs["position"]
        colour_any += sum(synth.read_attributes(c)[0] == attrs["colour"] for c in r.candidates) / len(r.candidates)
    if n == 0:
        raise ValueError("no caption of the embedded dataset among the samples: nothing to score")
    # Shape and background too (all four attributes of the kept sample), each beside its chance level.
    full = synth.score_attributes([r.candidates[0] for r in results], [r.caption for r in results])
    extra = {f"{a}_{w}": full[f"{a}_{w}"] for a in ("shape", "background", "all") for w in ("match", "chance")}
    return {"scored": n, "match": colour / n, "chance": 1 / len(synth.COLOURS),
            "position_match": position / n, "position_chance": 1 / len(synth.POSITIONS),
            "colour_and_position_match": both / n, "match_before_rerank": colour_any / n, **extra}
