"""The streaming prior loader: disjoint ranks in lockstep, determinism, exact resume, commit markers, validation, s3."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.prior import loader as prior_data
from pipeline.prior.loader import DataError, DataPlan, TokenLoader, check_plan, make_plan
from pipeline.prior.transformer import pad_text
from pipeline.storage import commit, schema

GRID, TEXT_VOCAB, IMAGE_VOCAB = 2, 100, 50
META = {"schema_version": schema.SCHEMA_VERSION, "grid": GRID, "embed_dim": 4, "dvae": {"vocab_size": IMAGE_VOCAB},
        "clip": {"arch": "tiny"}, "tokenizer": {"vocab_size": TEXT_VOCAB}, "preprocess": {"image_size": 16}}
ARGS = {"rank": 0, "world": 1, "micro_batch": 5, "text_len": 8, "seed": 3, "shuffle_buffer": 16, "prefetch": 2}


def shard_rows(shard_id: int, n: int) -> dict:
    rng = np.random.default_rng(shard_id)
    return {"key": [f"s{shard_id:02d}-{i:04d}" for i in range(n)],
            "text_tokens": [rng.integers(0, TEXT_VOCAB, rng.integers(0, 13)).tolist() for _ in range(n)],
            "image_tokens": rng.integers(0, IMAGE_VOCAB, (n, GRID * GRID))}


def write_shard(folder: str, shard_id: int, n: int = 40, meta: dict = META, rows: dict | None = None,
                grid: int = GRID, row_group_size: int = 7, committed: bool = True, emb: float = 0.0) -> dict:
    """A token shard with small row groups, committed the repo's way: Parquet first, then the marker. Every CLIP
    embedding is ``emb`` everywhere (0: unusable, as rows without embeddings read)."""
    rows = dict(rows or shard_rows(shard_id, n))
    n = len(rows["key"])
    rows |= {"url": [""] * n, "caption": ["c"] * n, "sha256": [""] * n, "width": [16] * n, "height": [16] * n,
             "clip_image_emb": np.full((n, 4), emb), "clip_text_emb": np.full((n, 4), emb),
             "clip_similarity": np.zeros(n)}
    table = schema.build_table(rows, grid, 4, dict(meta, source_shard=f"{shard_id:05d}"))
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    fs, path = commit.fs_and_path(folder)
    fs.makedirs(path, exist_ok=True)
    commit.atomic_write(fs, f"{path}/{shard_id:05d}.parquet", buf.getvalue())
    if committed:
        commit.write_marker(fs, path, shard_id, {"shard_id": shard_id, "rows": n})
    return rows


@pytest.fixture
def tokens(tmp_path) -> tuple[str, dict]:
    folder = str(tmp_path / "tokens")
    rows = {}
    for sid, n in ((0, 40), (1, 33), (2, 47)):
        r = write_shard(folder, sid, n)
        rows |= {k: (t, im) for k, t, im in zip(r["key"], r["text_tokens"], r["image_tokens"])}
    return folder, rows


def take(loader: TokenLoader, n: int, start: int = 0) -> list[prior_data.Batch]:
    it = loader.batches(start)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def by_epoch(loader: TokenLoader, epochs: int) -> list[list[list[str]]]:
    """Per epoch, the keys of each step."""
    out: list[list[list[str]]] = [[] for _ in range(epochs)]
    for b in loader.batches():
        e = loader.position(b.step)["epoch"]
        if e == epochs:
            break
        out[e].append(b.keys)
    return out


def test_two_ranks_are_disjoint_in_lockstep_and_cover_each_epoch(tokens):
    folder, rows = tokens
    plan = make_plan(folder, unit_rows=4)
    assert plan.num_rows == 120 and [s["row_groups"] for s in plan.shards][1] == [7, 7, 7, 7, 5]
    loaders = [TokenLoader(plan, **ARGS | {"rank": r, "world": 2, "micro_batch": 4}) for r in range(2)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch > 0
    runs = [by_epoch(ld, 4) for ld in loaders]
    for e in range(4):
        steps = [len(run[e]) for run in runs]
        assert steps[0] == steps[1] == loaders[0].epoch_steps(e) == loaders[1].epoch_steps(e)
        keys = [[k for batch in run[e] for k in batch] for run in runs]
        assert all(len(set(k)) == len(k) for k in keys), "a key repeats within a rank's epoch"
        assert not set(keys[0]) & set(keys[1]), "ranks share keys within an epoch"
        assert len(keys[0]) + len(keys[1]) >= 0.85 * len(rows)
        assert all(len(batch) == 4 for run in runs for batch in run[e])
    assert runs[0][0] != runs[0][1], "epochs are reshuffled"
    b = take(loaders[0], 1)[0]
    assert b.text.shape == (4, 8) and b.text.dtype == torch.int64 and b.image.shape == (4, GRID * GRID)
    assert b.image.dtype == torch.int64
    for ld in loaders:
        ld.close()


def test_same_arguments_same_order_other_seed_other_order(tokens):
    plan = make_plan(tokens[0], unit_rows=4)
    a = [b.keys for b in take(TokenLoader(plan, **ARGS), 30)]
    b = [b.keys for b in take(TokenLoader(make_plan(tokens[0], unit_rows=4), **ARGS), 30)]
    c = [b.keys for b in take(TokenLoader(plan, **ARGS | {"seed": 4}), 30)]
    assert a == b and a != c


@pytest.mark.parametrize("micro_batch,buffer", [(5, 16), (9, 3)])  # (9, 3): a batch straddles several windows
def test_resume_at_any_step_equals_the_uninterrupted_run_and_reads_less(tokens, monkeypatch, micro_batch, buffer):
    plan = make_plan(tokens[0], unit_rows=4)
    args = ARGS | {"micro_batch": micro_batch, "shuffle_buffer": buffer}
    full_loader = TokenLoader(plan, **args)
    per_epoch = full_loader.epoch_steps(0)
    total = per_epoch + full_loader.epoch_steps(1) + 3
    full = take(full_loader, total)
    assert [b.step for b in full] == list(range(total))
    mid_window = next(s for s in range(1, per_epoch) if full_loader.position(s)["offset_in_window"] > 0)
    assert full_loader.position(per_epoch) == {"epoch": 1, "step_in_epoch": 0, "window": 0, "offset_in_window": 0}
    loads = []
    original = TokenLoader._load_window
    monkeypatch.setattr(TokenLoader, "_load_window", lambda self, e, w: loads.append((e, w)) or original(self, e, w))
    for start in (1, mid_window, per_epoch - 1, per_epoch, per_epoch + 2, total - 1):
        loads.clear()
        loader = TokenLoader(plan, **args | {"prefetch": 1})
        got = take(loader, total - start, start)
        loader.close()
        for g, want in zip(got, full[start:]):
            assert g.step == want.step and g.keys == want.keys
            assert torch.equal(g.text, want.text) and torch.equal(g.image, want.image)
        pos = loader.position(start)
        assert loads[0] == (pos["epoch"], pos["window"]), "resume started reading before its window"
        if start >= per_epoch:
            assert loader.row_groups_read < full_loader.row_groups_read
            assert min(loads) >= (1, 0), "resume replayed the previous epoch"


def test_uncommitted_shard_is_never_planned_or_read(tokens):
    folder, rows = tokens
    write_shard(folder, 3, 30, committed=False)
    plan = make_plan(folder, unit_rows=4)
    assert [s["shard"] for s in plan.shards] == [0, 1, 2]
    keys = {k for b in take(TokenLoader(plan, **ARGS), 40) for k in b.keys}
    assert keys <= set(rows) and not any(k.startswith("s03") for k in keys)


def test_mixed_or_foreign_shards_are_refused_by_name(tmp_path, tokens):
    folder = tokens[0]
    write_shard(folder, 3, meta=META | {"tokenizer": {"vocab_size": 200}})
    with pytest.raises(DataError, match=r"00003\.parquet: metadata \['tokenizer'\] disagrees with .*00000\.parquet"):
        make_plan(folder, unit_rows=4)
    other = str(tmp_path / "other")
    write_shard(other, 0)
    fs, path = commit.fs_and_path(other)
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["a"]}), buf)
    commit.atomic_write(fs, f"{path}/00001.parquet", buf.getvalue())
    commit.write_marker(fs, path, 1, {})
    with pytest.raises(DataError, match=r"00001\.parquet: not a token shard"):
        make_plan(other, unit_rows=4)
    with pytest.raises(DataError, match="no committed token shards"):
        make_plan(str(tmp_path / "empty"), unit_rows=4)


def bad_rows(kind: str) -> dict:
    rows = shard_rows(0, 30)
    if kind == "text":
        rows["text_tokens"][17] = [1, TEXT_VOCAB + 5]
    else:
        rows["image_tokens"][23, 2] = IMAGE_VOCAB
    return rows


@pytest.mark.parametrize("kind,key,value", [("text", "s00-0017", TEXT_VOCAB + 5), ("image", "s00-0023", IMAGE_VOCAB)])
def test_out_of_range_tokens_name_file_and_key(tmp_path, kind, key, value):
    folder = str(tmp_path / kind)
    write_shard(folder, 0, rows=bad_rows(kind))
    loader = TokenLoader(make_plan(folder, unit_rows=4), **ARGS | {"micro_batch": 1})
    with pytest.raises(DataError, match=rf"00000\.parquet: row key '{key}': {kind} token {value} >="):
        take(loader, 30)
    loader.close()


def test_wrong_grid_is_refused_by_name(tmp_path, tokens):
    with pytest.raises(DataError, match=r"00000\.parquet: token grid 2, the prior expects 3"):
        TokenLoader(make_plan(tokens[0], unit_rows=4), **ARGS | {"expect_grid": 3})
    folder = str(tmp_path / "lying")
    write_shard(folder, 0, meta=META | {"grid": 3})
    with pytest.raises(DataError, match=r"00000\.parquet: image_tokens rows hold 4 tokens but metadata grid 3"):
        make_plan(folder, unit_rows=4)


def test_too_few_rows_for_the_world_is_explained(tokens):
    with pytest.raises(DataError, match="too few rows/units for world 4 × micro_batch 40.*smaller loader unit_rows"):
        TokenLoader(make_plan(tokens[0], unit_rows=4), **ARGS | {"world": 4, "micro_batch": 40})


def test_check_plan_and_json_round_trip(tokens):
    folder = tokens[0]
    plan = make_plan(folder, unit_rows=4)
    again = DataPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan and again.fingerprint() == plan.fingerprint()
    write_shard(folder, 3)  # committed after the plan: not in it, not an error
    check_plan(plan)
    write_shard(folder, 1, 33, row_group_size=5)  # same rows, other row groups
    with pytest.raises(DataError, match=r"00001\.parquet: rewritten since the plan was made"):
        check_plan(plan)
    write_shard(folder, 1, 33)
    check_plan(plan)
    fs, path = commit.fs_and_path(folder)
    fs.rm(f"{path}/00002.parquet")
    with pytest.raises(DataError, match=r"00002\.parquet: shard file missing"):
        check_plan(plan)
    fs.rm(commit.marker_path(path, 2))
    with pytest.raises(DataError, match=r"00002\.parquet: in the training plan but no longer committed"):
        check_plan(plan)
    with pytest.raises(DataError, match="fingerprint"):
        DataPlan.from_json(plan.to_json() | {"unit_rows": 4, "fingerprint": "0" * 16})


def test_s3_plan_and_batches_equal_local(tokens, s3):
    local = tokens[0]
    url = "s3://laion/prior-tokens"
    for sid, n in ((0, 40), (1, 33), (2, 47)):
        write_shard(url, sid, n)
    write_shard(url, 3, committed=False)
    lp, sp = make_plan(local, unit_rows=4), make_plan(url, unit_rows=4)
    assert [s["row_groups"] for s in lp.shards] == [s["row_groups"] for s in sp.shards]
    assert sp.shards[0]["path"] == "laion/prior-tokens/00000.parquet" and sp.meta == lp.meta
    check_plan(sp)
    for a, b in zip(take(TokenLoader(lp, **ARGS), 8, 3), take(TokenLoader(sp, **ARGS), 8, 3)):
        assert a.keys == b.keys and torch.equal(a.text, b.text) and torch.equal(a.image, b.image)


def test_thread_errors_surface_and_close_stops_the_thread(tokens, monkeypatch):
    plan = make_plan(tokens[0], unit_rows=4)
    loader = TokenLoader(plan, **ARGS)
    it = loader.batches()
    next(it)
    assert any(t.name == "token-loader-r0" for t in threading.enumerate())
    loader.close()
    assert not any(t.name == "token-loader-r0" for t in threading.enumerate())

    def boom(self, shard, groups):
        raise OSError("s3 went away")

    monkeypatch.setattr(TokenLoader, "_read_groups", boom)
    with pytest.raises(OSError, match="s3 went away"):
        take(TokenLoader(plan, **ARGS), 1)


def test_text_is_padded_exactly_like_pad_text(tokens):
    folder, rows = tokens
    loader = TokenLoader(make_plan(folder, unit_rows=4), **ARGS)
    batches = take(loader, 20)
    lists = [rows[k][0] for b in batches for k in b.keys]
    assert any(len(t) > 8 for t in lists) and any(len(t) == 0 for t in lists)
    assert torch.equal(torch.cat([b.text for b in batches]), pad_text(lists, 8, TEXT_VOCAB))
    image = np.stack([rows[k][1] for b in batches for k in b.keys])
    assert np.array_equal(torch.cat([b.image for b in batches]).numpy(), image)


def _committed_for_real(folder: str, shard_id: int, n: int) -> str:
    """A token shard written and committed by tokenize's own writer (marker with size, sha256 and footer hash)."""
    from pipeline.tokenize.writer import write_token_shard

    rows = shard_rows(shard_id, n)
    rows |= {"url": [""] * n, "caption": ["c"] * n, "sha256": [""] * n, "width": [16] * n, "height": [16] * n,
             "clip_image_emb": np.zeros((n, 4)), "clip_text_emb": np.zeros((n, 4)), "clip_similarity": np.zeros(n)}
    write_token_shard(folder, shard_id, rows, META)
    return f"{folder}/{shard_id:05d}.parquet"


def test_a_shard_rewritten_after_its_commit_is_refused_not_trained_on(tmp_path):
    folder = str(tmp_path / "tokens")
    path = _committed_for_real(folder, 0, 25)
    _committed_for_real(folder, 1, 25)
    plan = make_plan(folder, 8)  # as committed: fine
    table = pq.read_table(path)  # rewritten: valid Parquet, its 25 rows twice, same metadata
    pq.write_table(pa.concat_tables([table, table]), path)
    with pytest.raises(DataError, match=r"00000\.parquet: \d+ bytes, its commit marker records \d+"):
        make_plan(folder, 8)
    with pytest.raises(DataError, match=r"00000\.parquet"):
        check_plan(plan)  # a resume onto the rewritten shard is refused too


def test_a_corrupt_page_is_caught_by_its_checksum_and_named(tmp_path):
    folder = str(tmp_path / "tokens")
    path = _committed_for_real(folder, 0, 40)
    data = bytearray(open(path, "rb").read())
    marker = json.loads(open(f"{folder}/00000.done.json").read())
    rg = pq.ParquetFile(path).metadata.row_group(0)
    col = next(rg.column(i) for i in range(rg.num_columns)  # image_tokens: a column the loader reads
               if rg.column(i).path_in_schema.startswith("image_tokens"))
    data[col.data_page_offset + col.total_compressed_size // 2] ^= 0xFF  # a flipped byte: same size, same footer
    open(path, "wb").write(bytes(data))
    plan = make_plan(folder, 8)  # size and footer still match the marker: only the page checksum can tell
    assert marker["footer_sha256"] == plan.shards[0]["footer_sha256"]
    loader = TokenLoader(plan, **ARGS, expect_grid=GRID)
    with pytest.raises(DataError, match=r"00000\.parquet: cannot read row group"):
        for _ in zip(range(20), loader.batches()):
            pass
    loader.close()


def test_duplicate_keys_in_a_row_group_are_refused(tmp_path):
    folder = str(tmp_path / "tokens")
    rows = shard_rows(0, 10)
    rows["key"][3] = rows["key"][2]
    write_shard(folder, 0, rows=rows)
    loader = TokenLoader(make_plan(folder, 4), **ARGS, expect_grid=GRID)
    with pytest.raises(DataError, match=r"row key 's00-0002' appears more than once"):
        next(iter(loader.batches()))
    loader.close()


def test_held_out_rows_are_read_but_never_valid_for_the_loss(tmp_path):
    """The diffusion prior's held-out split: rows whose key hash falls in ``heldout_percent`` stay in the batch
    order (resume relies on it) but ``valid`` is False for exactly them: the loss never trains on what eval-prior
    scores."""
    folder = str(tmp_path / "tokens")
    for sid, n in ((0, 40), (1, 33)):
        write_shard(folder, sid, n, emb=0.5)
    plan = make_plan(folder, 7)
    with TokenLoader(plan, **{**ARGS, "micro_batch": 8}, embeddings=True, heldout_percent=25.0) as loader:
        batches = take(loader, loader.epoch_steps(0))
    keys = [k for b in batches for k in b.keys]
    valid = np.concatenate([b.valid.numpy() for b in batches])
    held = prior_data.heldout_mask(keys, 25.0)
    assert 0 < held.sum() < len(keys)  # both kinds are in the epoch
    assert np.array_equal(valid, ~held)
    with TokenLoader(plan, **{**ARGS, "micro_batch": 8}, embeddings=True, heldout_percent=0.0) as loader:
        assert all(bool(b.valid.all()) for b in take(loader, 3))  # no split: every usable row counts


def test_plan_fingerprint_follows_the_shards_and_row_groups(tmp_path, tokens):
    """The fingerprint a checkpoint stores to refuse a resume on other data: the same plan gives the same one, a
    plan over other row groups another; 16 hex digits (checkpoints written before compare it as text)."""
    folder, _ = tokens
    plan = make_plan(folder, 7)
    assert plan.fingerprint() == make_plan(folder, 7).fingerprint() == DataPlan.from_json(plan.to_json()).fingerprint()
    assert len(plan.fingerprint()) == 16 and int(plan.fingerprint(), 16) >= 0
    write_shard(folder, 3, 10)
    assert make_plan(folder, 7).fingerprint() != plan.fingerprint()
