"""The run report as markdown: caption faithfulness, the diffusion prior's section, the per-stage figures and the
pictures; ``report.json`` beside it holds every figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
