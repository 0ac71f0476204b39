"""forget on a run of a few thousand rows: rows removed, shards rewritten, seconds per shard.

    python benchmarks/bench_forget.py [--shards 20] [--rows 200] [--remove 40] [--in-flight 2]

Builds a committed run with the stages' own writers in a temporary folder: ``--shards`` image shards of ``--rows``
rows (64 px PNGs of the embedded dataset, img2dataset's layout), their token shards (grid 32: 1,024 dVAE codes a row,
512-wide CLIP embeddings), dedup side tables and the clip-retrieval export; then a takedown of ``--remove`` keys drawn
at random over the run (seed 0), run as Ray tasks (one per affected shard id, ``--in-flight`` at once) on a local
cluster of 2 CPUs. Reports the record's figures: rows removed, shards rewritten per kind, the lookup's seconds, the
mean seconds of one shard task (image + token shard + side table + export partition) and the whole wall time. Not an
A/B comparison: no other tool removes rows from every derived artefact, so there is no other side to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._results import machine_state, write_result  # noqa: E402
from pipeline import stages  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.curate.dedup import SIDE_SCHEMA  # noqa: E402
from pipeline.demo import synth  # noqa: E402
from pipeline.download.shard import META_SCHEMA, commit_staged  # noqa: E402
from pipeline.download.writer import ShardWriter  # noqa: E402
from pipeline.storage import commit, schema  # noqa: E402
from pipeline.tokenize.export import export_clip_retrieval  # noqa: E402
from pipeline.tokenize.writer import write_token_shard  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID, D = 32, 512
META = {"schema_version": "1", "grid": GRID, "embed_dim": D, "dvae": {"id": "b", "sha256": "0", "vocab_size": 8192},
        "clip": {"arch": "b", "pretrained": "", "sha256": "0"}, "tokenizer": {"id": "bpe", "vocab_size": 49408},
        "preprocess": {"image_size": 64}}


def _shard(cfg, sid: int, rows: int, pictures: list[bytes]) -> None:
    images, tokens = cfg.path("images"), cfg.path("tokens")
    staging = f"{images}/_staging/{sid:05d}"
    fs, stage = commit.fs_and_path(staging)
    fs.makedirs(stage, exist_ok=True)
    writer = ShardWriter("webdataset", staging, sid, META_SCHEMA, "png")
    keys = [f"{sid:05d}{i:03d}" for i in range(rows)]
    for i, k in enumerate(keys):
        meta = {n: None for n in META_SCHEMA.names}
        meta.update(key=k, url=f"http://img.example/{sid}/{i}.png", caption=f"caption {k}", status="success",
                    code="ok", sha256=f"{sid:032x}{i:032x}")
        writer.write(pictures[(sid * rows + i) % len(pictures)], k, meta["caption"], meta)
    writer.close()
    stats = {"shard_id": sid, "count": rows, "successes": rows, "failed_to_download": 0, "failed_to_resize": 0,
             "filtered": 0, "codes": {"ok": rows}, "bytes_downloaded": 0, "bytes_written": 0, "start_time": 0.0,
             "end_time": 0.0, "attempt": 0}
    with fs.open(f"{stage}/{sid:05d}_stats.json", "wb") as f:
        f.write(json.dumps(stats).encode())
    commit_staged(images, staging, sid, "webdataset", stats)
    rng = np.random.default_rng(sid)
    emb = rng.standard_normal((rows, D)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    write_token_shard(tokens, sid, {
        "key": keys, "url": [f"http://img.example/{sid}/{i}.png" for i in range(rows)],
        "caption": [f"caption {k}" for k in keys], "sha256": [f"{sid:032x}{i:032x}" for i in range(rows)],
        "width": [64] * rows, "height": [64] * rows, "text_tokens": [rng.integers(1, 49000, 12).tolist()] * rows,
        "image_tokens": rng.integers(0, 8192, (rows, GRID * GRID)), "clip_image_emb": emb, "clip_text_emb": emb,
        "clip_similarity": np.ones(rows, np.float32)}, META)
    side = pa.table({"key": keys, "cluster": [0] * rows, "duplicate_of": [None] * rows, "cosine": [None] * rows},
                    schema=SIDE_SCHEMA)
    sfs, spath = commit.fs_and_path(commit.join(tokens, "_dedup"))
    sfs.makedirs(spath, exist_ok=True)
    data = schema.table_bytes(side)
    commit.atomic_write(sfs, f"{spath}/{sid:05d}.parquet", data)
    tfs, tpath = commit.fs_and_path(tokens)
    commit.write_marker(sfs, spath, sid, {"shard_id": sid, "rows": rows, "bytes": len(data),
                                          "footer_sha256": schema.footer_sha256(data),
                                          "token_shard": commit.read_marker(tfs, tpath, sid)["footer_sha256"]})


def build(root: str, shards: int, rows: int):
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [f"run_dir={root}"])
    samples, _ = synth.make_samples(64, 0.0, seed=0)
    pictures = [synth.render_png(s, 64) for s in samples]
    for sid in range(shards):
        _shard(cfg, sid, rows, pictures)
    export_clip_retrieval(cfg.path("tokens"), cfg.path("clip_retrieval"))
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--remove", type=int, default=40)
    ap.add_argument("--in-flight", type=int, default=2)
    args = ap.parse_args()
    machine = machine_state()
    with tempfile.TemporaryDirectory(prefix="bench-forget-") as tmp:
        t0 = time.time()
        cfg = build(os.path.join(tmp, "run"), args.shards, args.rows)
        build_s = time.time() - t0
        rng = np.random.default_rng(0)
        picks = rng.choice(args.shards * args.rows, args.remove, replace=False)
        keys = [f"{p // args.rows:05d}{p % args.rows:03d}" for p in sorted(picks)]
        with open(os.path.join(tmp, "keys.txt"), "w") as f:
            f.write("\n".join(keys) + "\n")
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
        try:
            out = stages.forget(cfg, {"keys": os.path.join(tmp, "keys.txt")}, max_in_flight=args.in_flight)
        finally:
            ray.shutdown()
    write_result("forget", {
        "command": "python benchmarks/bench_forget.py " + " ".join(sys.argv[1:]),
        "run": {"shards": args.shards, "rows": args.shards * args.rows, "grid": GRID, "embed_dim": D,
                "kinds": ["images", "tokens", "dedup", "export"], "build_s": round(build_s, 2)},
        "takedown": {"keys_asked": len(keys), "rows_removed": out["rows_removed"],
                     "shards_rewritten": out["shards_rewritten"],
                     "shard_ids_rewritten": out["shard_tasks"],
                     "rewritten_per_kind": {k: len(v) for k, v in out["rewritten"].items()},
                     "find_s": out["find_seconds"], "seconds_per_shard_task": out["seconds_per_shard"],
                     "forget_s": out["seconds"], "wall_s": out["wall_s"], "in_flight": args.in_flight},
        "machine": machine,
    })


if __name__ == "__main__":
    main()
