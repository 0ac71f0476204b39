"""Committed token shards open in the tools people query Parquet with: the README's DuckDB, Hugging Face `datasets`
and polars snippets, run as written there (the demo's folder replaced by a test folder), give the shards' own rows
and values; `commit.committed_files` leaves out a shard whose marker is not written yet, which the glob would not."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
from tokenshards import GRID, META, token_rows

from pipeline.storage import commit, schema
from pipeline.tokenize.writer import write_token_shard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARD_ROWS = {0: 40, 1: 25, 2: 33}
DEMO_TOKENS = "runs/demo/tokens"


def readme_snippets() -> list[str]:
    """The python blocks of the README's "Query the token shards" section, in order."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## Query the token shards", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A finished tokenize folder: three shards committed by the stage's writer, shard 1 rewritten once through the
    commit protocol's generation switch (as a takedown does), so its file is 00001.g1.parquet."""
    folder = str(tmp_path_factory.mktemp("open") / "tokens")
    for shard_id, n in SHARD_ROWS.items():
        write_token_shard(folder, shard_id, token_rows(shard_id, n, seed=shard_id), META)
    fs, path = commit.fs_and_path(folder)
    old = commit.read_marker(fs, path, 1)
    shutil.copy(f"{folder}/00001.parquet", f"{folder}/00001.g1.parquet")
    commit.switch_generation(fs, path, 1, old, dict(old, generation=1))
    assert sorted(n for n in os.listdir(folder) if n.endswith(".parquet")) == [
        "00000.parquet", "00001.g1.parquet", "00002.parquet"]
    return folder


@pytest.fixture(scope="module")
def snippets(tokens, tmp_path_factory):
    """Each README snippet run as written, on ``tokens``; what it defined. Hugging Face stays offline and caches
    under the test's folder."""
    import datasets

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    blocks = readme_snippets()
    assert len(blocks) == 3 and all(f"'{DEMO_TOKENS}/*.parquet'" in b or f'"{DEMO_TOKENS}/*.parquet"' in b
                                    for b in blocks), "the README's snippets changed form"
    out = []
    try:
        for block in blocks:
            ns: dict = {}
            exec(compile(block.replace(DEMO_TOKENS, tokens), "README.md", "exec"), ns)
            out.append(ns)
    finally:
        mp.undo()
    return out


def shard_table(tokens):
    table, _ = schema.read_token_shards(tokens)  # every committed shard, checked against its marker
    return table


def test_duckdb_counts_rows_and_averages_clip_similarity(tokens, snippets):
    table = shard_table(tokens)
    count, mean = snippets[0]["row"]
    assert count == table.num_rows == sum(SHARD_ROWS.values())
    assert mean == pytest.approx(float(np.mean(table.column("clip_similarity").to_numpy())), rel=1e-6)


def test_hugging_face_datasets_gives_image_tokens_as_lists_of_ints(tokens, snippets):
    ds = snippets[1]["ds"]
    table = shard_table(tokens)
    assert ds.num_rows == table.num_rows
    first = ds[0]["image_tokens"]
    assert isinstance(first, list) and len(first) == GRID * GRID and all(isinstance(t, int) for t in first)
    by_key = {k: t for k, t in zip(ds["key"], ds["image_tokens"])}
    want = dict(zip(table.column("key").to_pylist(), table.column("image_tokens").to_pylist()))
    assert by_key == want
    assert ds.features["image_tokens"].length == GRID * GRID  # the fixed grid survives as the feature's length


def test_polars_reads_the_same_rows_and_tokens(tokens, snippets):
    df = snippets[2]["df"]
    table = shard_table(tokens)
    assert sorted(df["key"].to_list()) == sorted(table.column("key").to_pylist())
    assert df.width == table.num_columns
    tokens_by_key = dict(zip(df["key"].to_list(), df["image_tokens"].to_list()))
    assert tokens_by_key == dict(zip(table.column("key").to_pylist(), table.column("image_tokens").to_pylist()))
    assert df["clip_similarity"].mean() == pytest.approx(snippets[0]["row"][1], rel=1e-6)


def test_committed_files_leave_out_a_shard_not_committed_yet(tokens, tmp_path):
    import duckdb
    import polars as pl
    from datasets import load_dataset

    running = str(tmp_path / "tokens")
    shutil.copytree(tokens, running)
    write_token_shard(running, 3, token_rows(3, 7, seed=3), META)  # written, marker not yet: a run still going
    os.remove(commit.marker_path(running, 3))
    files = commit.committed_files(running)
    assert [os.path.basename(f) for f in files] == ["00000.parquet", "00001.g1.parquet", "00002.parquet"]
    committed = sum(SHARD_ROWS.values())
    assert duckdb.sql(f"SELECT count(*) FROM '{running}/*.parquet'").fetchall() == [(committed + 7,)]  # the glob
    assert duckdb.read_parquet(files).aggregate("count(*)").fetchall() == [(committed,)]
    assert pl.read_parquet(files).height == committed
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == committed
