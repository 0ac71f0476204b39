"""Tokenize's commit loop on its own (no Ray): batches arrive in any order, split across shards, some rows twice (a
retried task) and a whole shard unreadable; each shard is committed once, when whole, with every key exactly once."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.storage import commit
from pipeline.tokenize.writer import SHARD_ERROR, ShardAssembler

GRID, DIM = 2, 4
META = {"schema_version": "1", "grid": GRID, "embed_dim": DIM}


def _batch(rows: list[tuple[int, str, str]]) -> dict[str, np.ndarray]:
    """Encoded rows as the encoder actors return them: (shard, key, reject reason or '')."""
    n = len(rows)
    return {"shard_id": np.array([s for s, _, _ in rows]), "key": np.array([k for _, k, _ in rows], dtype=object),
            "reject": np.array([r for _, _, r in rows], dtype=object), "url": np.array(["u"] * n, dtype=object),
            "caption": np.array(["c"] * n, dtype=object), "sha256": np.array(["h"] * n, dtype=object),
            "width": np.full(n, 8), "height": np.full(n, 8),
            "text_tokens": np.array([[1, 2, -1]] * n, dtype=np.int32),
            "image_tokens": np.zeros((n, GRID * GRID), np.uint16),
            "clip_image_emb": np.ones((n, DIM), np.float16), "clip_text_emb": np.ones((n, DIM), np.float16),
            "clip_similarity": np.ones(n, np.float32)}


def test_each_shard_committed_once_when_whole_with_every_key_once(tmp_path):
    folder = str(tmp_path / "tokens")
    fs, path = commit.fs_and_path(folder)
    seen_rows = []
    asm = ShardAssembler(folder, META, {0: 3, 1: 2, 2: 4}, on_rows=seen_rows.append)
    asm.add(_batch([(0, "k00", ""), (1, "k10", "")]))
    asm.add(_batch([(0, "k00", ""), (0, "k01", "decode_error: OSError")]))  # k00 again: a retried task
    assert commit.committed_shards(fs, path) == {}  # nothing is whole yet
    asm.add(_batch([(2, SHARD_ERROR, "shard 00002: sha256 changed")]))
    asm.add(_batch([(1, "k11", ""), (0, "k02", ""), (0, "k01", "decode_error: OSError")]))
    markers = commit.committed_shards(fs, path)
    assert sorted(markers) == [0, 1] and asm.failed == {"00002": "shard 00002: sha256 changed"}
    assert markers[0]["rows"] == 2 and markers[0]["rejected_keys"] == {"k01": "decode_error: OSError"}
    assert markers[0]["rejects"] == {"decode_error": 1}
    keys = pq.read_table(f"{path}/00000.parquet").column("key").to_pylist()
    assert keys == ["k00", "k02"]  # sorted, each once, the rejected one left out
    assert pq.read_table(f"{path}/00001.parquet").column("key").to_pylist() == ["k10", "k11"]
    assert asm.missing() == {}
    assert sum(seen_rows) == 3 + 2 + 4  # every row counted once (the failed shard counts as done)


def test_a_shard_still_missing_rows_is_reported_not_committed(tmp_path):
    folder = str(tmp_path / "tokens")
    asm = ShardAssembler(folder, META, {0: 3, 5: 0})
    asm.commit(5)  # a shard whose every URL failed: an empty token shard
    asm.add(_batch([(0, "a", ""), (0, "b", ""), (0, "a", "")]))
    assert asm.missing() == {0: 1}
    markers = commit.committed_shards(*commit.fs_and_path(folder))
    assert list(markers) == [5] and markers[5]["rows"] == 0


def test_duplicate_keys_inside_one_write_are_refused(tmp_path):
    from pipeline.tokenize.writer import concat, write_token_shard

    rows = concat([{k: v for k, v in _batch([(0, "x", ""), (0, "x", "")]).items() if k not in ("shard_id", "reject")}])
    with pytest.raises(ValueError, match="duplicate keys"):
        write_token_shard(str(tmp_path), 0, rows, META)


def test_the_marker_is_written_after_the_parquet_and_never_without_it(tmp_path, monkeypatch):
    """Commit protocol: a crash while the Parquet file is being written must leave the shard uncommitted (no marker),
    and in a clean commit the marker is the last file published."""
    from pipeline.tokenize.writer import concat, write_token_shard

    rows = concat([{k: v for k, v in _batch([(0, "a", ""), (0, "b", "")]).items() if k not in ("shard_id", "reject")}])
    folder = str(tmp_path / "tokens")
    fs, path = commit.fs_and_path(folder)
    real = commit.atomic_write
    published: list[str] = []

    def dies_on_parquet(fs_, p, data):
        if p.endswith(".parquet"):
            raise OSError("disk gone mid-write")
        published.append(p)
        real(fs_, p, data)

    monkeypatch.setattr(commit, "atomic_write", dies_on_parquet)
    with pytest.raises(OSError, match="disk gone"):
        write_token_shard(folder, 0, rows, META)
    assert commit.committed_shards(fs, path) == {} and published == [], "a marker without its Parquet file"

    def records(fs_, p, data):
        published.append(p.rsplit("/", 1)[-1])
        real(fs_, p, data)

    monkeypatch.setattr(commit, "atomic_write", records)
    manifest = write_token_shard(folder, 0, rows, META)
    assert published == ["00000.parquet", "00000.done.json"]
    assert manifest["bytes"] == (tmp_path / "tokens" / "00000.parquet").stat().st_size
    assert commit.committed_shards(fs, path)[0]["rows"] == 2


def test_token_id_zero_is_kept_padding_dropped_and_reject_reasons_counted(tmp_path):
    """BPE id 0 is a real token ('!' in CLIP's vocabulary): only the -1 padding of the encoder's batches is dropped.
    Reject reasons are counted by kind, each reject once."""
    from pipeline.tokenize.writer import concat, write_token_shard

    batch = {k: v for k, v in _batch([(0, "a", ""), (0, "b", "")]).items() if k not in ("shard_id", "reject")}
    batch["text_tokens"] = np.array([[0, 5, -1], [7, 0, 0]], dtype=np.int32)
    rejects = {"c": "decode_error: OSError", "d": "decode_error: truncated", "e": "empty_caption"}
    manifest = write_token_shard(str(tmp_path), 0, concat([batch]), META, rejects)
    tokens = pq.read_table(tmp_path / "00000.parquet").column("text_tokens").to_pylist()
    assert tokens == [[0, 5], [7, 0, 0]]
    assert manifest["rejects"] == {"decode_error": 2, "empty_caption": 1} and manifest["rejected_keys"] == rejects


def test_an_empty_shard_has_the_grid_of_its_metadata(tmp_path):
    """A shard whose every URL failed still gets a token shard, typed like the others (grid 4: 16 codes a row)."""
    meta = dict(META, grid=4)
    asm = ShardAssembler(str(tmp_path), meta, {0: 0})
    asm.commit(0)
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.num_rows == 0 and table.schema.field("image_tokens").type.list_size == 16
