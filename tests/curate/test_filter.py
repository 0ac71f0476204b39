"""Per-run filters: DuckDB conditions over token-shard columns frozen into the data plan, counts per clause, the
loader reading only kept rows (every rank, exactly resumable), and every bad filter refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.curate.filter import check_filter, decode_mask, encode_mask, parse_predicate
from pipeline.errors import ConfigError, DataError, FilterError
from pipeline.prior.loader import DataPlan, TokenLoader, make_plan
from pipeline.tokenize import writer

META = {"grid": 2, "embed_dim": 4, "dvae": {"vocab_size": 16}, "clip": {"model": "test"},
        "tokenizer": {"vocab_size": 50}, "preprocess": {}, "schema_version": "1"}


def shard_rows(s: int, n: int, extras: dict[str, list] | None = None) -> dict:
    rng = np.random.default_rng(s)
    emb = rng.standard_normal((n, 4)).astype(np.float32)
    return {"key": [f"{s:05d}{i:04d}" for i in range(n)], "url": [f"u{i}" for i in range(n)],
            "caption": [f"c{i}" for i in range(n)], "sha256": [""] * n, "width": [64 * (i % 8) for i in range(n)],
            "height": [64] * n, "text_tokens": [[1, 2]] * n, "image_tokens": np.full((n, 4), s, np.int64),
            "clip_image_emb": emb, "clip_text_emb": emb,
            "clip_similarity": (np.arange(n) % 10 / 20).astype(np.float32), **(extras or {})}


def write(folder: Path, s: int, n: int, extras: dict[str, tuple[str, list]] | None = None) -> None:
    extras = extras or {}
    meta = dict(META, extra_columns={k: t for k, (t, _) in extras.items()}) if extras else META
    writer.write_token_shard(str(folder), s, shard_rows(s, n, {k: np.asarray(v, dtype=object)
                                                              for k, (_, v) in extras.items()}), meta)


@pytest.fixture
def tokens(tmp_path) -> Path:
    """Three shards of 40 rows; punsafe (with nulls) and LICENSE as additional columns."""
    folder = tmp_path / "tokens"
    for s in range(3):
        write(folder, s, 40, {"punsafe": ("double", [None if i % 7 == 0 else i / 40 for i in range(40)]),
                              "LICENSE": ("string", ["cc-by" if i % 2 else "unknown" for i in range(40)])})
    return folder


def expected(i: int) -> bool:  # the filter of test_counts..., row by row
    return (i % 10) / 20 >= 0.2 and i % 7 != 0 and i / 40 < 0.5 and 64 * (i % 8) >= 256


def test_counts_per_clause_and_mask_frozen_in_the_plan(tokens):
    text = "clip_similarity >= 0.2 and PUNSAFE < 0.5 and width >= 256"
    plan = make_plan(str(tokens), 8, text)
    sel = plan.selection
    assert sel["filter"] == text and sel["columns"] == ["clip_similarity", "punsafe", "width"]
    want = [expected(i) for i in range(40)] * 3
    c = sel["counts"]
    assert c["rows"] == 120 and c["kept"] == sum(want) == plan.num_rows and c["dropped"] == 120 - sum(want)
    sims = [(i % 10) / 20 >= 0.2 for i in range(40)]
    assert [x["kept"] for x in c["clauses"]][0] == 3 * sum(sims)
    assert c["clauses"][1]["kept"] == 3 * sum(i % 7 != 0 and i / 40 < 0.5 for i in range(40))  # NULL is not true
    assert sum(x["dropped_after_previous"] for x in c["clauses"]) == c["dropped"]
    for s in plan.shards:
        assert decode_mask(s["kept"], 40).tolist() == want[:40] and s["kept_rows"] == sum(want[:40])
    again = DataPlan.from_json(plan.to_json())
    assert again.fingerprint() == plan.fingerprint() and again.selection == sel
    other = make_plan(str(tokens), 8, "clip_similarity >= 0.3")
    assert other.fingerprint() != plan.fingerprint() != make_plan(str(tokens), 8).fingerprint()
    tampered = plan.to_json()
    tampered["shards"][0]["kept"] = encode_mask(np.ones(40, bool))
    with pytest.raises(DataError, match="does not match its fingerprint"):
        DataPlan.from_json(tampered)


def test_loader_reads_only_kept_rows_on_every_rank_and_resumes_exactly(tokens):
    plan = make_plan(str(tokens), 8, "clip_similarity >= 0.2 and punsafe < 0.5 and width >= 256")
    kept = {f"{s:05d}{i:04d}" for s in range(3) for i in range(40) if expected(i)}
    args = dict(world=2, micro_batch=2, text_len=4, seed=3, shuffle_buffer=8)
    seen = []
    for rank in range(2):
        with TokenLoader(plan, rank=rank, **args) as loader:
            steps = loader.steps_per_epoch
            got = [b for _, b in zip(range(steps), loader.batches(0))]
            seen += [k for b in got for k in b.keys]
            assert all(int(b.image[0, 0]) == int(b.keys[0][:5]) for b in got)  # rows stay with their tokens
            with TokenLoader(plan, rank=rank, **args) as resumed:  # from step 3: what the first one yields there
                later = [b.keys for _, b in zip(range(steps - 3), resumed.batches(3))]
            assert later == [b.keys for b in got[3:]]
    assert set(seen) <= kept and len(seen) == len(set(seen)) >= len(kept) - 2 * 2 * 2  # at most a batch per rank cut
    with pytest.raises(DataError, match="made with prior.filter='clip_similarity"):
        check_filter(plan, "clip_similarity >= 0.3", "prior.filter", "out/step4")
    check_filter(plan, plan.selection["filter"], "prior.filter", "out/step4")
    with pytest.raises(DataError, match="made with prior.filter=''"):
        check_filter(make_plan(str(tokens), 8), "width > 1", "prior.filter", "out/step4")


def test_an_unknown_column_lists_the_available_ones(tokens):
    with pytest.raises(FilterError, match=r"unknown column 'psafe' .*available: caption, clip_image_emb, .*LICENSE, "
                                          r"punsafe, sha256"):
        make_plan(str(tokens), 8, "psafe < 0.1")
    with pytest.raises(FilterError, match="dedup side table, which .* does not have yet: run `python -m pipeline "
                                          "dedup"):
        make_plan(str(tokens), 8, "duplicate_of is null")


def test_a_syntax_error_shows_where_and_the_config_refuses_it(tmp_path):
    with pytest.raises(FilterError, match=r"syntax error at or near \"<\" at character 18:\n  width >= 256 and  < 3\n"
                                          r" {20}\^$"):
        parse_predicate("width >= 256 and  < 3")
    with pytest.raises(ConfigError, match="config key 'prior.filter': syntax error"):
        load_config("configs/tiny.yaml", [f"run_dir={tmp_path}", "prior.filter=width >="])
    with pytest.raises(ConfigError, match="config key 'decoder.filter': subqueries are not allowed"):
        load_config("configs/tiny.yaml", [f"run_dir={tmp_path}", "decoder.filter=key in (select 1)"])
    for bad in ("width > 1; drop table t", "width > 1 order by width", ""):
        with pytest.raises(FilterError):
            parse_predicate(bad)


def test_a_type_mismatch_names_the_shard(tokens):
    with pytest.raises(FilterError, match=r"'LICENSE > 0.5' cannot be evaluated on .*00000.parquet: Binder Error: "
                                          "Cannot compare values of type VARCHAR"):
        make_plan(str(tokens), 8, "LICENSE > 0.5")
    with pytest.raises(FilterError, match="read_csv"):  # no file access from a filter
        make_plan(str(tokens), 8, "read_csv('/etc/passwd') is null")


def test_a_filter_that_keeps_nothing_is_refused_with_its_counts(tokens):
    with pytest.raises(FilterError, match=r"keeps none of the 120 rows .* refusing to train. Per clause: "
                                          r"\(width >= 256\): keeps 60, drops 60; \(clip_similarity > 1\.0\): keeps "
                                          r"0, drops 120"):
        make_plan(str(tokens), 8, "width >= 256 and clip_similarity > 1.0")


def test_shards_with_different_extra_columns_mix_when_the_used_columns_agree(tmp_path):
    folder = tmp_path / "tokens"
    write(folder, 0, 20, {"punsafe": ("double", [0.0] * 20), "LICENSE": ("string", ["a"] * 20)})
    write(folder, 1, 20, {"punsafe": ("double", [1.0] * 20)})
    write(folder, 2, 20)
    plan = make_plan(str(folder), 8, "width >= 0")  # v1 columns only: all three shards mix
    assert plan.num_rows == 60
    with pytest.raises(FilterError, match=r"column 'punsafe' is not in .*00002.parquet \(its columns: key, url"):
        make_plan(str(folder), 8, "punsafe < 0.5")
    folder2 = tmp_path / "tokens2"
    write(folder2, 0, 20, {"punsafe": ("double", [0.0] * 20), "LICENSE": ("string", ["a"] * 20)})
    write(folder2, 1, 20, {"punsafe": ("double", [1.0] * 20)})
    plan = make_plan(str(folder2), 8, "punsafe < 0.5")
    assert plan.num_rows == 20 and [s["kept_rows"] for s in plan.shards] == [20, 0]
    write(folder2, 2, 20, {"punsafe": ("string", ["0"] * 20)})
    with pytest.raises(FilterError, match="column 'punsafe' has different types in the planned shards: double in"):
        make_plan(str(folder2), 8, "punsafe < 0.5")


def test_columns_are_checked_from_footers_before_the_ranks_start(tokens):
    from pipeline.curate.filter import check_columns

    check_columns(str(tokens), "punsafe < 0.1 and LICENSE = 'cc-by'", "prior.filter")
    with pytest.raises(FilterError, match="config key 'decoder.filter': unknown column 'psafe'"):
        check_columns(str(tokens), "psafe < 0.1", "decoder.filter")
    with pytest.raises(FilterError, match="run `python -m pipeline dedup` first"):
        check_columns(str(tokens), "duplicate_of is null", "prior.filter")
