"""The run report as markdown: caption faithfulness, the diffusion prior's section, the per-stage figures and the
pictures; ``report.json`` beside it holds every figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.report import overview as overview_lib


def write_markdown(folder: str, stages: dict[str, dict[str, Any]], scores: dict[str, float],
                   figures: dict[str, str], diffusion: dict[str, Any] | None = None,
                   dalle2: dict[str, Any] | None = None, overview: dict[str, Any] | None = None) -> str:
    """``report.md`` and ``report.json``; ``overview`` (``pipeline.report.overview``: headline figures, throughput,
    the dataset grid's keys, the histograms) replaces the key=value stage table and is recorded whole."""
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
    if dalle2 is not None:
        lines += dalle2_section(scores, dalle2.get("samples"), dalle2.get("eval"))
    if overview is not None:
        lines += overview_lib.markdown(stages, overview["headlines"], overview["throughput"])
    else:
        lines += ["## Stages", "", "| stage | wall s | figures |", "|---|---|---|"]
        for name, st in stages.items():
            figs = ", ".join(f"{k}={_fmt(v)}" for k, v in st.items()
                             if k != "wall_s" and not isinstance(v, (list, dict)))
            lines.append(f"| {name} | {st.get('wall_s', 0):.1f} | {figs} |")
        lines.append("")
    for title, fname in figures.items():
        lines += [f"## {title}", "", f"![{title}]({fname})", ""]
    path = Path(folder) / "report.md"
    path.write_text("\n".join(lines))
    record = {"stages": stages, "scores": scores, **({"overview": overview} if overview is not None else {})}
    if dalle2 is not None:
        record["dalle2"] = {"scores": dalle2.get("samples"), "decoder_eval": dalle2.get("eval")}
    (Path(folder) / "report.json").write_text(json.dumps(record, indent=1, default=str))
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
            f"{_fmt(ev.get('uncond_recall_at_k', ''))} |", ""] + _retrieved_rows(ev.get("retrieved") or {})


def _retrieved_rows(retrieved: dict[str, Any]) -> list[str]:
    """The nearest image to each query, scored by what can tell when many images are identical renders."""
    if not retrieved:
        return []
    lines = ["What the nearest image shows: CLIP similarity to the caption, and attributes read from its pixels.", "",
             "| nearest image to | CLIP to caption | all four (pixels) | colour (pixels) | shape (pixels) |",
             "|---|---|---|---|---|"]
    chance: dict[str, Any] = {}
    for source, label in (("prior", "the prior's prediction"), ("text", "the text embedding (baseline)"),
                          ("random", "a random dataset image (baseline)")):
        if source in retrieved:
            r, px = retrieved[source], retrieved[source]["pixels"]
            chance = px if px.get("scored") else chance
            lines.append(f"| {label} | {_fmt(r['clip_to_caption'])} | {_fmt(px.get('all_match', ''))} | "
                         f"{_fmt(px.get('colour_match', ''))} | {_fmt(px.get('shape_match', ''))} |")
    if chance:
        lines.append(f"| chance | | {chance['all_chance']:.3f} | {chance['colour_chance']:.3f} | "
                     f"{chance['shape_chance']:.3f} |")
    return lines + [""]


_PIXEL_ROWS = (("shape colour matches caption", "match", "chance"),
               ("position matches caption", "position_match", "position_chance"),
               ("colour and position", "colour_and_position_match", None),
               ("shape", "shape_match", "shape_chance"), ("background", "background_match", "background_chance"),
               ("all four attributes", "all_match", "all_chance"))


def dalle2_section(d1: dict[str, Any], samples: dict[str, Any] | None, ev: dict[str, Any] | None) -> list[str]:
    """DALL-E 2 on held-out captions (pixel-read attributes of the reranked samples beside DALL-E 1's and chance),
    then the decoder on held-out rows (CLIP and pixel scores per image source against random dataset images)."""
    lines = ["## DALL-E 2: diffusion prior → decoder (held-out captions)", ""]
    if samples is not None and "match" in samples:
        lines += [f"{samples['scored']} held-out captions (never trained on), {samples.get('samples', '?')} images "
                  "decoded, the CLIP-reranked best of each read back from its pixels.", "",
                  "| measure | DALL-E 2 | DALL-E 1 | chance |", "|---|---|---|---|"]
        for label, key, chance_key in _PIXEL_ROWS:
            chance = samples["chance"] * samples["position_chance"] if chance_key is None else samples[chance_key]
            lines.append(f"| {label} | {samples[key]:.3f} | {_fmt(d1.get(key, ''))} | {chance:.3f} |")
        lines.append("")
    if ev is not None:
        sc = ev["scores"]
        lines += [f"Decoder on {ev['evaluated']} held-out rows ({ev['sampler']}, {ev['steps']} steps, guidance "
                  f"{ev['guidance_scale']}); pixel chance: all four {_fmt(ev.get('pixel_all_chance', ''))}, colour "
                  f"{_fmt(ev.get('pixel_colour_chance', ''))}.", "",
                  "| images | CLIP to caption | CLIP to true image emb | all four (pixels) | colour (pixels) |",
                  "|---|---|---|---|---|"]
        names = (("true_emb", "decoded from the true image embedding"),
                 ("prior_emb", "decoded from the prior's embedding of the caption"),
                 ("random_images", "random dataset images (baseline)"), ("originals", "the originals (ceiling)"))
        for key, label in names:
            if key in sc:
                px = sc[key]["pixels"]
                lines.append(f"| {label} | {sc[key]['clip_to_caption']:.3f} | {sc[key]['clip_to_image_emb']:.3f} | "
                             f"{_fmt(px.get('all_match', ''))} | {_fmt(px.get('colour_match', ''))} |")
        lines.append("")
    return lines
