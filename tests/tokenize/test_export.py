"""clip-retrieval layout export: embedding-reader and a faiss inner-product index read our token shards unchanged."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from tokenshards import GRID, META, D, token_rows

from pipeline.storage import commit, schema
from pipeline.tokenize import export
from pipeline.tokenize.writer import write_token_shard

SHARD_ROWS = {0: 40, 1: 25, 2: 33}


@pytest.fixture
def tokens(tmp_path):
    folder = tmp_path / "tokens"
    for shard_id, n in SHARD_ROWS.items():
        write_token_shard(str(folder), shard_id, token_rows(shard_id, n, seed=shard_id), META)
    # shard 3 never committed: its Parquet is whole but its marker was never written
    write_token_shard(str(folder), 3, token_rows(3, 7, seed=3), META)
    os.remove(commit.marker_path(str(folder), 3))
    return folder


def by_key(folder) -> dict[str, dict]:
    table, _ = schema.read_token_shards(str(folder))
    img = table.column("clip_image_emb").combine_chunks().flatten().to_numpy().reshape(-1, D)
    txt = table.column("clip_text_emb").combine_chunks().flatten().to_numpy().reshape(-1, D)
    return {k: {"img": img[i], "txt": txt[i], "caption": c, "url": u} for i, (k, c, u) in enumerate(
        zip(table.column("key").to_pylist(), table.column("caption").to_pylist(), table.column("url").to_pylist()))}


def mtimes(folder) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) for f in files}


def test_layout_matches_clip_retrieval_writer(tokens, tmp_path):
    out = tmp_path / "export"
    summary = export.export_clip_retrieval(str(tokens), str(out))
    assert summary == {"shards": 3, "rows": 98, "out": str(out), "embed_dim": D, "shards_written": 3,
                       "shards_skipped": 0, "empty_shards": []}
    for kind, ext in export.SUBFOLDERS.items():
        assert sorted(os.listdir(out / kind)) == [f"{kind}_{i:05d}.{ext}" for i in range(3)]  # no shard 3
    want = by_key(tokens)
    for i, n in SHARD_ROWS.items():
        img = np.load(out / "img_emb" / f"img_emb_{i:05d}.npy")
        txt = np.load(out / "text_emb" / f"text_emb_{i:05d}.npy")
        meta = pd.read_parquet(out / "metadata" / f"metadata_{i:05d}.parquet")
        assert img.dtype == txt.dtype == np.float16 and img.shape == txt.shape == (n, D)
        assert list(meta.columns) == export.METADATA_COLUMNS and len(meta) == n
        assert (meta["image_path"] == meta["key"]).all()
        for r, key in enumerate(meta["key"]):  # row r of each npy is row r of the metadata
            assert np.array_equal(img[r], want[key]["img"]) and np.array_equal(txt[r], want[key]["txt"])
            assert meta["caption"][r] == want[key]["caption"] and meta["url"][r] == want[key]["url"]


@pytest.mark.parametrize("kind", ["img_emb", "text_emb"])
def test_embedding_reader_returns_our_vectors_for_our_keys(tokens, tmp_path, kind):
    from embedding_reader import EmbeddingReader

    out = tmp_path / "export"
    export.export_clip_retrieval(str(tokens), str(out))
    reader = EmbeddingReader(str(out / kind), file_format="parquet_npy", meta_columns=["key", "caption", "url"],
                             metadata_folder=str(out / "metadata"))
    assert reader.count == 98 and reader.dimension == D
    want = by_key(tokens)
    seen = []
    for emb, meta in reader(batch_size=16, start=0, end=reader.count, show_progress=False):
        for vec, key, caption in zip(emb, meta["key"], meta["caption"]):
            assert np.array_equal(vec, want[key]["img" if kind == "img_emb" else "txt"]), key
            assert caption == want[key]["caption"]
            seen.append(key)
    assert sorted(seen) == sorted(want) and len(seen) == len(set(seen))


def inner_product_topk(index, emb: np.ndarray, k: int = 3):
    scores, ids = index.search(np.ascontiguousarray(emb, dtype=np.float32), k)
    return scores, ids


def metadata_rows(out) -> pd.DataFrame:
    """What clip-retrieval's back does to map index ids to rows: the sorted metadata files, concatenated."""
    files = sorted((out / "metadata").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def check_self_retrieval(index, out, tokens) -> None:
    want = by_key(tokens)
    rows = metadata_rows(out)
    queries = np.stack([want[k]["img"] for k in rows["key"]])
    scores, ids = inner_product_topk(index, queries)
    assert index.ntotal == len(rows) == 98
    assert (ids[:, 0] == np.arange(len(rows))).all(), "an image's own embedding is not its first hit"
    assert (rows["key"].to_numpy()[ids[:, 0]] == rows["key"].to_numpy()).all()
    assert (scores[:, 0] > scores[:, 1]).all() and np.allclose(scores[:, 0], 1.0, atol=5e-3)


def test_faiss_inner_product_index_finds_each_image_first(tokens, tmp_path):
    """The index autofaiss builds for this size, without autofaiss (its numpy<2 pin conflicts with this venv):
    the npy files read through embedding-reader in its order, as float32, into an exact inner-product index."""
    import faiss
    from embedding_reader import EmbeddingReader

    out = tmp_path / "export"
    export.export_clip_retrieval(str(tokens), str(out))
    reader = EmbeddingReader(str(out / "img_emb"), file_format="npy")
    index = faiss.IndexFlatIP(reader.dimension)
    for emb, _ in reader(batch_size=32, start=0, end=reader.count, show_progress=False):
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
    check_self_retrieval(index, out, tokens)


def test_autofaiss_build_index_finds_each_image_first(tokens, tmp_path):
    """autofaiss itself over the export: what clip-retrieval runs on these files."""
    import autofaiss  # a dev dependency (the Makefile installs it): a missing one fails here, never skips

    out = tmp_path / "export"
    export.export_clip_retrieval(str(tokens), str(out))
    # save_on_disk=False: autofaiss 2.18 under numpy 2 writes the index, then fails to json-dump its metrics
    # (numpy float32); the index it returns is the one it would have saved.
    index, _ = autofaiss.build_index(embeddings=str(out / "img_emb"), metric_type="ip", save_on_disk=False,
                                     max_index_memory_usage="100MB", current_memory_available="1G", nb_cores=1,
                                     verbose=40)
    check_self_retrieval(index, out, tokens)


def test_rerun_skips_and_completes_partial_export(tokens, tmp_path):
    out = tmp_path / "export"
    export.export_clip_retrieval(str(tokens), str(out))
    before = mtimes(out)
    again = export.export_clip_retrieval(str(tokens), str(out))
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3 and again["rows"] == 98
    assert mtimes(out) == before
    # an export cut short after shard 1's embeddings: only the missing metadata file is written
    os.remove(out / "metadata" / "metadata_00001.parquet")
    third = export.export_clip_retrieval(str(tokens), str(out))
    assert third["shards_written"] == 1 and third["shards_skipped"] == 2
    after = mtimes(out)
    assert {k: v for k, v in after.items() if v != before.get(k)}.keys() == {"metadata/metadata_00001.parquet"}
    assert not [n for n in after if ".tmp-" in n]


def test_uncommitted_then_committed_and_empty_shards(tokens, tmp_path):
    out = tmp_path / "export"
    export.export_clip_retrieval(str(tokens), str(out))
    assert not (out / "img_emb" / "img_emb_00003.npy").exists()
    # shard 3 gets committed later, shard 4 is empty (every URL of its image shard failed)
    write_token_shard(str(tokens), 3, token_rows(3, 7, seed=3), META)
    empty = token_rows(4, 0, seed=4)
    empty["image_tokens"] = np.zeros((0, GRID * GRID), np.uint16)
    write_token_shard(str(tokens), 4, empty, META)
    summary = export.export_clip_retrieval(str(tokens), str(out))
    assert summary["shards_written"] == 1 and summary["shards"] == 4 and summary["empty_shards"] == [4]
    assert np.load(out / "img_emb" / "img_emb_00003.npy").shape == (7, D)
    assert not (out / "metadata" / "metadata_00004.parquet").exists()


def test_refuses_other_tokens_and_foreign_files(tokens, tmp_path):
    out = tmp_path / "export"
    export.export_clip_retrieval(str(tokens), str(out))
    other = tmp_path / "other"
    write_token_shard(str(other), 0, token_rows(0, 3, seed=9), dict(META, clip={"arch": "ViT-B-16"}))
    with pytest.raises(commit.RunMismatchError, match="different settings"):
        export.export_clip_retrieval(str(other), str(out))
    (out / "img_emb" / "img_emb_00099.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="different partitions"):
        export.export_clip_retrieval(str(tokens), str(out))


def test_cli(tokens, tmp_path, capsys):
    out = tmp_path / "cli"
    assert export.main(["--tokens", str(tokens), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 98 and summary["shards_written"] == 3


def test_export_index_writes_the_indices_and_indices_paths_clip_back_loads(tokens, tmp_path, capsys):
    """--index: image.index and text.index (autofaiss, inner product) in clip back's names, each finding every row's
    own embedding first; indices_paths.json naming the shards' CLIP as all_clip does; a rerun keeps the indices."""
    import faiss

    out = tmp_path / "export"
    assert export.main(["--tokens", str(tokens), "--out", str(out), "--index"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["index"]["image.index"]["rows"] == summary["index"]["text.index"]["rows"] == 98
    check_self_retrieval(faiss.read_index(str(out / "image.index")), out, tokens)
    spec = json.loads((out / "indices_paths.json").read_text())["tokens"]
    assert spec["indice_folder"] == "." and spec["clip_model"] == "open_clip:ViT-B-32/random.pt"  # META's CLIP
    assert not spec["enable_mclip_option"] and not spec["provide_aesthetic_embeddings"] and not spec["use_jit"]
    before = (out / "image.index").stat().st_mtime_ns
    again = export.export_clip_retrieval(str(tokens), str(out), index=True)
    assert again["index"] == {"image.index": {"kept": True}, "text.index": {"kept": True}}
    assert (out / "image.index").stat().st_mtime_ns == before
    from pipeline.errors import ConfigError
    from pipeline.tokenize.knn_index import clip_model_name

    assert clip_model_name({"arch": "local-dir:/r/clip"}) == ("open_clip:local-dir:clip/open_clip_model.safetensors",
                                                              "/r/clip")
    with pytest.raises(ConfigError, match="tokenize.export_index.*hf-hub:org/m"):
        clip_model_name({"arch": "hf-hub:org/m"})


def test_s3_output(tokens, s3):
    from embedding_reader import EmbeddingReader

    out = "s3://laion/export-clip-retrieval"
    summary = export.export_clip_retrieval(str(tokens), out)
    assert summary["shards_written"] == 3
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls("laion/export-clip-retrieval/img_emb", refresh=True)) == [
        f"img_emb_{i:05d}.npy" for i in range(3)]
    reader = EmbeddingReader(f"{out}/img_emb", file_format="parquet_npy", meta_columns=["key"],
                             metadata_folder=f"{out}/metadata")
    want = by_key(tokens)
    for emb, meta in reader(batch_size=50, start=0, end=reader.count, show_progress=False):
        assert all(np.array_equal(v, want[k]["img"]) for v, k in zip(emb, meta["key"]))
    assert export.export_clip_retrieval(str(tokens), out)["shards_skipped"] == 3
