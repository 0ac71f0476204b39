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
