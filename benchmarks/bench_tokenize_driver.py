"""Tokenize's driver: CPU seconds per 10,000 rows when the workers write (today) against the driver writing (before).

    python benchmarks/bench_tokenize_driver.py [--shards 20] [--shard-size 400] [--pairs 5]

On a cluster the driver is the job driver on the head node, which should do bookkeeping only. Before this change it
pulled every encoded batch back (Ray Data ``iter_batches``) and assembled and wrote every token shard; at LAION
scale that is ~1.5 TB through one Python process. Now the encoder actors commit their own shards and the driver
receives one marker per shard.

- **after** (A): ``pipeline.tokenize.run.run_tokenize`` as it is.
- **before** (B): the previous path, rebuilt here from the same parts: decode tasks (a Ray Data ``flat_map``) →
  ``Encoder`` actor pool (``map_batches``) → ``iter_batches`` into the driver → ``ShardAssembler`` commits in the
  driver. Same models, images, batch size and encoder count.

Both on one local Ray cluster (``num_cpus`` 2) started once, so only the stage's own work is counted: the driver's
CPU is ``time.process_time()`` of this process (all its threads, Ray's core worker included) across the call. Runs
alternate A/B with the order flipped each pair; each run tokenizes the whole set into a fresh folder. Headline: the
median over pairs of before/after driver CPU per 10 k rows (goal: at least 10× less).

Also: the rows/s one writer's commit path sustains (``ShardAssembler`` + ``write_token_shard`` on encoded rows, in
one process): with a writer per encoder, the commit path scales with the encoders instead of capping at one
driver's rate.

Writes benchmarks/results/tokenize_driver.json and prints it as the last line.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

from _results import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def build(root: str, shards: int, shard_size: int):
    """Committed image shards of the embedded set, downloaded from the loopback server, and a tiny dVAE + 1-step
    CLIP (the tests' tiny models)."""
    import pandas as pd
    from conftest import make_tiny_models

    from pipeline.config import load_config
    from pipeline.demo import synth
    from pipeline.demo.server import ImageServer
    from pipeline.download.run import run_download

    samples, _ = synth.make_samples(shards * shard_size, 0.0, seed=0)
    with ImageServer({i: synth.render_png(s, 32) for i, s in enumerate(samples)}) as server:
        pd.DataFrame({"url": [server.url(i) for i in range(len(samples))],
                      "caption": [s.caption for s in samples]}).to_parquet(os.path.join(root, "urls.parquet"))
        cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
            f"run_dir={root}/run", f"download.input={root}/urls.parquet", "download.allow_private_addresses=true",
            f"download.shard_size={shard_size}", "clip.steps=1", "tokenize.batch_size=64", "tokenize.num_encoders=1"])
        run_download(cfg)
    make_tiny_models(cfg)
    return cfg


def after(cfg, out: str) -> dict[str, Any]:
    from dataclasses import replace

    from pipeline.tokenize.encode import encoder_spec
    from pipeline.tokenize.run import run_tokenize

    cfg = replace(cfg, tokenize=replace(cfg.tokenize, output=out))
    c0, t0 = time.process_time(), time.time()
    summary = run_tokenize(cfg, encoder_spec(cfg))
    return {"driver_cpu_s": time.process_time() - c0, "wall_s": time.time() - t0, "rows": summary["rows_in"]}


def before(cfg, out: str) -> dict[str, Any]:
    """The previous driver-writes path, from the same parts (see the module docstring)."""
    import ray

    from pipeline.storage import shards as shard_io
    from pipeline.tokenize.encode import Encoder, decode_shard, encoder_spec
    from pipeline.tokenize.writer import ShardAssembler

    c0, t0 = time.process_time(), time.time()
    spec = encoder_spec(cfg)
    images = cfg.path("images")
    committed = shard_io.committed_image_shards(images)
    todo = {s: m["successes"] for s, m in committed.items()}
    metadata = Encoder(spec).metadata()
    assembler = ShardAssembler(out, metadata, todo)
    size = cfg.download.image_size

    def expand(item: dict[str, Any]) -> list[dict[str, Any]]:
        sid = int(item["shard_id"])
        return decode_shard(images, sid, size, int(item["expected"]), committed[sid].get("files", {}))

    ds = ray.data.from_items([{"shard_id": s, "expected": n} for s, n in todo.items()], override_num_blocks=len(todo))
    ds = ds.flat_map(expand).map_batches(Encoder, fn_constructor_kwargs={"spec": spec}, batch_size=64,
                                         concurrency=1, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        assembler.add(batch)
    assert not assembler.missing()
    return {"driver_cpu_s": time.process_time() - c0, "wall_s": time.time() - t0, "rows": sum(todo.values())}


def commit_rate(out: str, rows: int = 4000, shard: int = 1000) -> float:
    """Rows/s through one writer's commit path (assemble + Parquet + marker) on already-encoded rows."""
    import numpy as np

    from pipeline.tokenize.writer import ShardAssembler

    meta = {"schema_version": "1", "grid": 8, "embed_dim": 32}
    rng = np.random.default_rng(0)
    t0 = time.time()
    for s in range(rows // shard):
        a = ShardAssembler(out, meta, {s: shard})
        for b in range(0, shard, 64):
            n = min(64, shard - b)
            a.add({"shard_id": np.full(n, s), "key": np.array([f"{s:05d}{i:05d}" for i in range(b, b + n)]),
                   "url": np.array(["https://x/y.jpg"] * n), "caption": np.array(["a red circle"] * n),
                   "sha256": np.array(["0" * 64] * n), "width": np.full(n, 32), "height": np.full(n, 32),
                   "reject": np.array([""] * n), "image_tokens": rng.integers(0, 32, (n, 64)).astype(np.uint16),
                   "clip_image_emb": rng.standard_normal((n, 32)).astype(np.float16),
                   "clip_text_emb": rng.standard_normal((n, 32)).astype(np.float16),
                   "clip_similarity": rng.random(n).astype(np.float32),
                   "text_tokens": np.full((n, 6), 7, dtype=np.int32)})
    return rows / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--shard-size", type=int, default=400)
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()
    import ray

    load = os.getloadavg()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = tempfile.mkdtemp(prefix="bench-tok-driver-")
    cfg = build(root, args.shards, args.shard_size)
    pairs = []
    for i in range(args.pairs):
        order = [("after", after), ("before", before)] if i % 2 == 0 else [("before", before), ("after", after)]
        got = {name: fn(cfg, os.path.join(root, f"tokens-{name}-{i}")) for name, fn in order}
        per10k = {k: v["driver_cpu_s"] / v["rows"] * 1e4 for k, v in got.items()}
        pairs.append({"order": [n for n, _ in order], **{f"{k}_driver_cpu_s_per_10k": round(v, 2)
                                                          for k, v in per10k.items()},
                      **{f"{k}_wall_s": round(v["wall_s"], 1) for k, v in got.items()},
                      "ratio": round(per10k["before"] / per10k["after"], 2)})
        print(pairs[-1], flush=True)
    ratios = [p["ratio"] for p in pairs]
    rate = commit_rate(os.path.join(root, "commit-rate"))
    ray.shutdown()
    result = {
        "headline": {"name": "driver CPU per 10k rows, before / after (workers write)",
                     "value": statistics.median(ratios), "goal": 10.0, "higher_is_better": True,
                     "min": min(ratios), "max": max(ratios)},
        "pairs": pairs, "rows_per_run": args.shards * args.shard_size,
        "commit_path_rows_per_s_per_writer": round(rate, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "loadavg_at_start": [round(x, 2) for x in load], "busy_at_start": load[0] > 1.0},
    }
    write_result("tokenize_driver", result)


if __name__ == "__main__":
    main()
