"""``python -m pipeline <stage> --config FILE [dotted.key=value ...]``; jobs/<stage>.py call ``main`` too."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home on import

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.errors import FINISHED_WITH_FAILURES, PipelineError  # noqa: E402

STAGES: dict[str, str] = {
    "download": "URL list (parquet/csv/tsv/jsonl, local or s3://) → resized webdataset image shards, on Ray tasks",
    "train-dvae": "train the discrete VAE on the committed image shards",
    "train-clip": "train a small open_clip CLIP on the image shards (skipped when clip.model names one)",
    "tokenize": "image shards → Parquet token shards (dVAE codes, CLIP embeddings, BPE ids), with Ray Data",
    "train-prior": "train the autoregressive prior with DeepSpeed (prior.num_procs ranks, ZeRO prior.zero_stage)",
    "export": "token shards → clip-retrieval's layout (img_emb/, text_emb/, metadata/) for embedding-reader/autofaiss",
    "export-prior": "a prior checkpoint (default: the newest complete) → consolidated <tag>/model.pt for sampling",
    "eval-dvae": "dVAE on held-out images: reconstruction MSE/PSNR, codebook perplexity and dead codes, a PNG",
    "eval-prior": "diffusion prior, held-out rows: cosine to the true image embedding vs text baseline, retrieval grid",
    "sample": "captions → images: KV-cached sampling, dVAE decode, CLIP rerank; writes a sample grid",
    "plan": "capacity plan: storage, hours and GPU memory per stage for --samples on --gpus (measured vs assumed)",
    "demo": "every stage on the embedded default dataset served over loopback HTTP, then a report",
}


RUNNERS = {"download": "download", "train-dvae": "train_dvae", "train-clip": "train_clip", "tokenize": "tokenize",
           "train-prior": "train_prior", "export": "export", "export-prior": "export_prior",
           "eval-dvae": "eval_dvae", "eval-prior": "eval_prior", "sample": "sample"}


def _run(stage: str, cfg: Config, args: argparse.Namespace) -> int:
    """Run one command through ``pipeline.stages``, print what it returns; the exit code (0, or
    ``FINISHED_WITH_FAILURES`` when shards failed: a script chaining stages must not carry on with missing data)."""
    from pipeline import stages

    if stage == "plan":  # pure arithmetic on the config: no stage runs
        from pipeline.capacity import format_plan

        print(format_plan(stages.plan(cfg, int(args.samples), args.gpus, gpu_mem_gb=args.gpu_mem_gb)))
        return 0
    if stage == "demo":
        result = stages.demo(cfg)
        for name, st in result["stages"].items():
            print(f"[demo] {name}: {st.get('wall_s', 0):.1f}s", flush=True)
        print(f"demo ok: report={result['report']} match={result['match']:.3f} chance={result['chance']:.3f}",
              flush=True)
        return 0
    runner: Callable[[Config], dict[str, Any]] = getattr(stages, RUNNERS[stage])
    summary = runner(cfg)
    print(json.dumps(summary, default=str))
    failed = summary.get("shards_failed") or {}
    if failed:
        names = ", ".join(sorted(failed)[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        print(f"error: {stage} finished with failures: {len(failed)} shard(s) failed ({names}); the summary above "
              "names each reason; fix the cause and rerun (committed shards are kept)", file=sys.stderr)
        return FINISHED_WITH_FAILURES
    return 0


def build_parser(prog: str = "python -m pipeline", only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="DALL-E style prior pipeline")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, help_text in STAGES.items():
        if only and name != only:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config keys")
        if name == "plan":
            p.add_argument("--samples", type=float, default=250e6, help="image-caption pairs (default 250M)")
            p.add_argument("--gpus", type=int, default=1024, help="GPUs for tokenize and training")
            p.add_argument("--gpu-mem-gb", type=float, default=80.0)
        if name == "download":
            p.add_argument("--retry-failed", action="store_true",
                           help="re-fetch only the rows that failed transiently, into new shards")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m pipeline") -> int:
    args = build_parser(prog).parse_args(argv)
    # Libraries (open_clip, DeepSpeed) log chatty INFO on the root logger; the pipeline's own loggers stay at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    overrides = list(args.overrides) + (["download.retry_failed=true"] if getattr(args, "retry_failed", False) else [])
    try:
        return _run(args.stage, load_config(args.config, overrides), args)
    except PipelineError as exc:  # bad input or config: one line naming what and where, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
