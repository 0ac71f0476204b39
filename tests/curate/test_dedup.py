"""dedup on planted near-duplicates: faiss k-means then cosine within clusters finds exactly the planted copies, names
the earlier key, commits a side table per token shard, and `duplicate_of is null` keeps one of each group."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.curate.dedup import run_dedup
from pipeline.errors import FilterError, RunMismatchError
from pipeline.prior.loader import make_plan
from pipeline.tokenize import writer

D, N, SHARDS = 32, 50, 4
META = {"grid": 2, "embed_dim": D, "dvae": {"vocab_size": 16}, "clip": {"model": "test"},
        "tokenizer": {"vocab_size": 50}, "preprocess": {}, "schema_version": "1"}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_planted(folder: Path, seed: int = 0) -> dict[str, str]:
    """SHARDS shards of N random embeddings; 20 rows are noisy copies (cosine ~0.99) of rows in earlier positions.
    Returns copy key → original key."""
    rng = np.random.default_rng(seed)
    emb = unit(rng.standard_normal((SHARDS * N, D)))
    keys = [f"{s:05d}{i:04d}" for s in range(SHARDS) for i in range(N)]
    planted = {}
    copies = rng.choice(np.arange(N, SHARDS * N), 20, replace=False)
    for copy in copies:  # originals are never copies, nor shared (groups of two, no chains)
        used = np.concatenate([copies, [keys.index(v) for v in planted.values()]]).astype(int)
        orig = int(rng.choice(np.setdiff1d(np.arange(copy), used)))
        emb[copy] = unit(emb[orig] + 0.1 / np.sqrt(D) * rng.standard_normal(D))
        planted[keys[copy]] = keys[orig]
    for s in range(SHARDS):
        part = slice(s * N, (s + 1) * N)
        writer.write_token_shard(str(folder), s, {
            "key": keys[part], "url": [""] * N, "caption": ["c"] * N, "sha256": [""] * N, "width": [1] * N,
            "height": [1] * N, "text_tokens": [[1]] * N, "image_tokens": np.zeros((N, 4), np.int64),
            "clip_image_emb": emb[part], "clip_text_emb": emb[part], "clip_similarity": np.zeros(N)}, META)
    return planted


def cfg_for(tmp_path: Path, tokens: Path, *over: str):
    return load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", f"tokenize.output={tokens}",
                                             "curate.dedup_clusters=4", *over])


def test_dedup_finds_the_planted_copies_and_the_filter_drops_them(tmp_path):
    tokens = tmp_path / "tokens"
    planted = write_planted(tokens)
    summary = run_dedup(cfg_for(tmp_path, tokens, "curate.dedup_threshold=0.9", "curate.dedup_max_cluster_rows=16"))
    assert summary["rows"] == SHARDS * N and summary["clusters"] == 4 and summary["duplicates"] == len(planted)
    side = tokens / "_dedup"
    found, rows = {}, 0
    for s in range(SHARDS):
        t = pq.read_table(side / f"{s:05d}.parquet")
        assert t.schema.names == ["key", "cluster", "duplicate_of", "cosine"]
        assert t.column("key").to_pylist() == pq.read_table(tokens / f"{s:05d}.parquet").column("key").to_pylist()
        marker = json.loads((side / f"{s:05d}.done.json").read_text())
        assert marker["rows"] == N and marker["token_shard"]
        for r in t.to_pylist():
            rows += 1
            if r["duplicate_of"] is not None:
                found[r["key"]] = r["duplicate_of"]
                assert r["cosine"] >= 0.9 and r["duplicate_of"] < r["key"]
            elif r["cosine"] is not None:
                assert r["cosine"] < 0.9
    assert found == planted and rows == SHARDS * N
    plan = make_plan(str(tokens), 8, "duplicate_of is null")
    assert plan.selection["counts"]["kept"] == SHARDS * N - len(planted)
    assert json.loads((side / "_summary.json").read_text())["duplicates"] == len(planted)
    again = run_dedup(cfg_for(tmp_path, tokens, "curate.dedup_threshold=0.9", "curate.dedup_max_cluster_rows=16"))
    assert again["shards_written"] == 0 and again["duplicates"] == len(planted)  # a rerun writes nothing
    with pytest.raises(RunMismatchError, match="threshold"):
        run_dedup(cfg_for(tmp_path, tokens, "curate.dedup_threshold=0.8"))


def test_blocked_comparison_equals_the_whole_cluster_at_once():
    from pipeline.curate.dedup import _earlier_max

    x = unit(np.random.default_rng(1).standard_normal((37, 8))).astype(np.float32)
    best, arg = _earlier_max(x, 5)
    s = x @ x.T
    for i in range(1, 37):
        assert arg[i] == int(np.argmax(s[i, :i])) and best[i] == pytest.approx(s[i, :i].max(), abs=1e-6)
    assert arg[0] == -1 and best[0] == -np.inf


def test_a_shard_committed_after_dedup_is_named_by_the_filter(tmp_path):
    tokens = tmp_path / "tokens"
    write_planted(tokens)
    run_dedup(cfg_for(tmp_path, tokens))
    writer.write_token_shard(str(tokens), SHARDS, {
        "key": ["x"], "url": [""], "caption": ["c"], "sha256": [""], "width": [1], "height": [1],
        "text_tokens": [[1]], "image_tokens": np.zeros((1, 4), np.int64), "clip_image_emb": unit(np.ones((1, D))),
        "clip_text_emb": unit(np.ones((1, D))), "clip_similarity": np.zeros(1)}, META)
    with pytest.raises(FilterError, match=r"no committed side table for token shard\(s\) \[4\]"):
        make_plan(str(tokens), 8, "duplicate_of is null")
    with pytest.raises(RunMismatchError, match="token_shards"):  # dedup again into the same folder: refused
        run_dedup(cfg_for(tmp_path, tokens))
