import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage import commit, schema
from pipeline.tokenize.writer import write_token_shard

META = {"schema_version": "1", "grid": 2, "embed_dim": 4, "dvae": {"sha256": "a"}, "clip": {"arch": "x"},
        "tokenizer": {"id": "bpe", "vocab_size": 100}, "preprocess": {"image_size": 8}}


def rows(keys):
    n = len(keys)
    return {"key": list(keys), "url": ["u"] * n, "caption": ["c"] * n, "sha256": ["h"] * n, "width": [8] * n,
            "height": [8] * n, "text_tokens": [[1, 2, -1]] * n, "image_tokens": np.arange(4 * n).reshape(n, 4),
            "clip_image_emb": np.ones((n, 4)) / 2, "clip_text_emb": np.ones((n, 4)) / 2,
            "clip_similarity": np.ones(n)}


def test_schema_types_match_design(tmp_path):
    write_token_shard(str(tmp_path), 0, rows(["b", "a"]), META)
    t = pq.read_table(tmp_path / "00000.parquet")
    assert t.schema.field("image_tokens").type == pa.list_(pa.uint16(), 4)
    assert t.schema.field("clip_image_emb").type == pa.list_(pa.float16(), 4)
    assert t.schema.field("text_tokens").type == pa.list_(pa.uint16())
    assert t.column("key").to_pylist() == ["a", "b"]  # sorted by key
    assert t.column("text_tokens").to_pylist() == [[1, 2], [1, 2]]  # -1 padding dropped
    assert schema.read_metadata(*commit.fs_and_path(str(tmp_path / "00000.parquet")))["source_shard"] == "00000"


def test_reader_refuses_mixed_provenance(tmp_path):
    write_token_shard(str(tmp_path), 0, rows(["a"]), META)
    write_token_shard(str(tmp_path), 1, rows(["b"]), dict(META, dvae={"sha256": "other"}))
    with pytest.raises(ValueError, match=r"metadata \['dvae'\] disagrees"):
        schema.read_token_shards(str(tmp_path))


def test_reader_ignores_uncommitted_shard(tmp_path):
    write_token_shard(str(tmp_path), 0, rows(["a", "b"]), META)
    (tmp_path / "00001.parquet").write_bytes(b"half-written")
    table, meta = schema.read_token_shards(str(tmp_path))
    assert table.num_rows == 2 and meta["grid"] == 2


def test_duplicate_keys_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate keys"):
        write_token_shard(str(tmp_path), 0, rows(["a", "a"]), META)
    assert not (tmp_path / "00000.done.json").exists()
