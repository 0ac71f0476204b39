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
    "train-decoder": "train DALL-E 2's decoder (CLIP image embedding → pixels, a diffusion U-Net) with DeepSpeed",
    "export": "token shards → clip-retrieval's layout (img_emb/, text_emb/, metadata/) for embedding-reader/autofaiss",
    "dedup": "near-duplicate images among the token shards (faiss k-means on CLIP image embeddings, cosine within "
             "clusters) → a committed side table <tokens>/_dedup that filters use (duplicate_of is null)",
    "import-embeddings": "published CLIP embeddings (embedding-reader / clip-retrieval layout: img_emb/, text_emb/, "
                         "metadata/) → token shards without image tokens, for the diffusion prior",
    "forget": "a takedown: rows named by --keys/--urls/--sha256 FILE removed from every image shard, token shard, "
              "side table and export of the run (each shard rewritten as a new generation), recorded in "
              "<run>/takedowns/, refused by later downloads; reports which checkpoints consumed them",
    "export-prior": "a prior checkpoint (default: the newest complete) → consolidated <tag>/model.safetensors",
    "eval-dvae": "dVAE on held-out images: reconstruction MSE/PSNR, codebook perplexity and dead codes, a PNG",
    "eval-prior": "diffusion prior, held-out rows: cosine to the true image embedding vs text baseline, retrieval grid",
    "eval-decoder": "decoder, held-out rows: images from the true and the prior's CLIP image embedding, scored by CLIP "
                    "and pixel-read attributes against random dataset images; a reconstruction grid",
    "sample": "captions → images: KV-cached sampling, dVAE decode, CLIP rerank; writes a sample grid",
    "report": "the run report (report.md, self-contained report.html) from what the stages left in the run",
    "plan": "capacity plan: storage, hours and GPU memory per stage for --samples on --gpus (measured vs assumed)",
    "demo": "every stage on the embedded default dataset served over loopback HTTP, then a report",
    "config": "print the resolved config a run would use, as YAML (what <stage>/config.yaml records); --keys lists "
              "every key with its type, default and meaning",
}


RUNNERS = {"download": "download", "train-dvae": "train_dvae", "train-clip": "train_clip", "tokenize": "tokenize",
           "train-prior": "train_prior", "train-decoder": "train_decoder", "export": "export",
           "export-prior": "export_prior", "eval-dvae": "eval_dvae", "eval-prior": "eval_prior",
           "eval-decoder": "eval_decoder", "sample": "sample", "report": "report", "dedup": "dedup",
           "import-embeddings": "import_embeddings"}


def _run(stage: str, cfg: Config, args: argparse.Namespace) -> int:
    """Run one command through ``pipeline.stages``, print what it returns; the exit code (0, or
    ``FINISHED_WITH_FAILURES`` when shards failed: a script chaining stages must not carry on with missing data)."""
    from pipeline import stages

    if stage == "plan":  # pure arithmetic on the config: no stage runs
        from pipeline.capacity import format_plan

        print(format_plan(stages.plan(cfg, int(args.samples), args.gpus, gpu_mem_gb=args.gpu_mem_gb)))
        return 0
    if stage == "config":
        from pipeline.config.docs import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    if stage == "demo":
        result = stages.demo(cfg)
        for name, st in result["stages"].items():
            print(f"[demo] {name}: {st.get('wall_s', 0):.1f}s", flush=True)
        print(f"demo ok: report={result['report']} match={result['match']:.3f} chance={result['chance']:.3f} "
              f"dalle2_match={result['dalle2_match']:.3f} dalle2_chance={result['dalle2_chance']:.3f}", flush=True)
        return 0
    if stage == "forget":
        return _forget(cfg, args)
    runner: Callable[[Config], dict[str, Any]] = getattr(stages, RUNNERS[stage])
    summary = runner(cfg)
    print(json.dumps(summary, default=str))
    from pipeline.report.summaries import record_summary

    record_summary(cfg.run_dir, stage, summary)
    failed = summary.get("shards_failed") or {}
    if failed:
        names = ", ".join(sorted(failed)[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        print(f"error: {stage} finished with failures: {len(failed)} shard(s) failed ({names}); the summary above "
              "names each reason; fix the cause and rerun (committed shards are kept)", file=sys.stderr)
        return FINISHED_WITH_FAILURES
    return 0


def _forget(cfg: Config, args: argparse.Namespace) -> int:
    from pipeline import stages
    from pipeline.forget.exposure import format_report

    files = {k: getattr(args, k) for k in ("keys", "urls", "sha256") if getattr(args, k)}
    summary = stages.forget(cfg, files, args.max_in_flight, args.in_process)
    print(json.dumps(summary, default=str))
    from pipeline.report.summaries import record_summary

    record_summary(cfg.run_dir, "forget", summary)
    if summary.get("note"):
        print(f"forget: {summary['note']}", file=sys.stderr)
    for line in format_report(summary.get("models") or {}):
        print(f"forget: {line}")
    return 0


def _prog() -> str:
    """The command as it was typed: ``python -m pipeline``, or the console script's name (``dalle-pipeline``)."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m pipeline" if base in ("", "-c", "__main__.py", "cli.py") else base


def _keys_epilog(stage: str) -> str:
    from pipeline.config.docs import format_keys, stage_keys

    return ("config keys this command reads (set them in the --config YAML or as dotted.key=value; `config --keys` "
            "lists every key):\n\n" + format_keys(stage_keys(stage)))


def build_parser(prog: str | None = None, only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or _prog(), description="DALL-E style prior pipeline")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, help_text in STAGES.items():
        if only and name != only:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=None if name == "config" else _keys_epilog(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config keys")
        if name == "plan":
            p.add_argument("--samples", type=float, default=250e6, help="image-caption pairs (default 250M)")
            p.add_argument("--gpus", type=int, default=1024, help="GPUs for tokenize and training")
            p.add_argument("--gpu-mem-gb", type=float, default=80.0)
        if name == "download":
            p.add_argument("--retry-failed", action="store_true",
                           help="re-fetch only the rows that failed transiently, into new shards")
        if name == "forget":
            for kind, what in (("keys", "sample keys"), ("urls", "image URLs"), ("sha256", "image sha256 digests")):
                p.add_argument(f"--{kind}", metavar="FILE", help=f"a file of {what}, one per line (local or s3://)")
            p.add_argument("--max-in-flight", type=int, default=4, help="shard tasks at once (default 4)")
            p.add_argument("--in-process", action="store_true", help="rewrite shards in this process, without Ray")
        if name == "config":
            p.add_argument("--keys", action="store_true",
                           help="list every config key (dotted name, type, default, meaning) instead")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.stage == "config" and args.keys:
        from pipeline.config.docs import format_keys, stage_keys

        print(format_keys(stage_keys("config")), end="")
        return 0
    # Libraries (open_clip, DeepSpeed) log chatty INFO on the root logger; the pipeline's own loggers stay at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    overrides = list(args.overrides) + (["download.retry_failed=true"] if getattr(args, "retry_failed", False) else [])
    try:
        return _run(args.stage, load_config(args.config, overrides), args)
    except PipelineError as exc:  # bad input or config: one line naming what and where, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
