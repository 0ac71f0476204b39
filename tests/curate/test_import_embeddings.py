"""import-embeddings: our export → import gives back the same keys, captions, embeddings, BPE ids and columns; the
diffusion prior's loader reads the imported shards and the autoregressive prior refuses them; a missing partition,
row counts that disagree and mismatched widths are refused naming the files, before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.curate.imports import run_import
from pipeline.errors import DataError, NotFoundError
from pipeline.prior.loader import TokenLoader, make_plan
from pipeline.prior.objectives import prior_shape
from pipeline.storage import schema
from pipeline.tokenize import writer
from pipeline.tokenize.export import export_clip_retrieval

D = 16


def bpe():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    return getattr(tok, "tokenizer", tok)


def write_tokens(folder: Path, shards: int = 3, n: int = 30) -> None:
    rng = np.random.default_rng(0)
    enc = bpe()
    meta = {"grid": 2, "embed_dim": D, "dvae": {"vocab_size": 16}, "clip": {"arch": "ViT-B-32"},
            "tokenizer": {"id": "open_clip:SimpleTokenizer", "vocab_size": 49408}, "preprocess": {},
            "schema_version": "1", "extra_columns": {"punsafe": "double", "LICENSE": "string"}}
    for s in range(shards):
        img = rng.standard_normal((n, D)).astype(np.float32)
        txt = rng.standard_normal((n, D)).astype(np.float32)
        img, txt = img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True)
        captions = [f"a photo of thing {s} {i}" for i in range(n)]
        writer.write_token_shard(str(folder), s, {
            "key": [f"{s:05d}{i:04d}" for i in range(n)], "url": [f"http://x/{s}/{i}.jpg" for i in range(n)],
            "caption": captions, "sha256": [f"{s}{i:063d}" for i in range(n)], "width": [100 + i for i in range(n)],
            "height": [200 + i for i in range(n)], "text_tokens": [enc.encode(c) for c in captions],
            "image_tokens": np.zeros((n, 4), np.int64), "clip_image_emb": img, "clip_text_emb": txt,
            "clip_similarity": (img * txt).sum(1),
            "punsafe": np.asarray([None if i % 4 == 0 else i / n for i in range(n)], dtype=object),
            "LICENSE": np.asarray([f"l{i % 3}" for i in range(n)], dtype=object)}, meta)


def import_cfg(tmp_path: Path, source: Path, out: Path):
    return load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", f"tokenize.output={out}",
                                             f"curate.import_source={source}", "curate.import_clip=ViT-B-32/openai"])


@pytest.fixture
def exported(tmp_path) -> tuple[Path, Path]:
    tokens, out = tmp_path / "tokens", tmp_path / "export"
    write_tokens(tokens)
    export_clip_retrieval(str(tokens), str(out))
    return tokens, out


def test_export_then_import_gives_back_keys_captions_embeddings(tmp_path, exported):
    tokens, source = exported
    back = tmp_path / "imported"
    summary = run_import(import_cfg(tmp_path, source, back))
    assert summary["partitions"] == 3 and summary["rows"] == 90 and summary["embed_dim"] == D
    a, _ = schema.read_token_shards(str(tokens))
    b, meta = schema.read_token_shards(str(back))
    for col in ("key", "caption", "url", "sha256", "width", "height", "text_tokens", "clip_image_emb",
                "clip_text_emb", "clip_similarity", "punsafe", "LICENSE"):
        assert b.column(col).to_pylist() == a.column(col).to_pylist(), col
    assert "image_tokens" not in b.column_names and meta["grid"] == 0
    first = schema.read_metadata(*_fs(str(back / "00000.parquet")))
    assert first["preprocess"] == {"imported_from": str(source), "clip_model": "ViT-B-32/openai"}
    assert first["clip"]["arch"] == "ViT-B-32" and first["extra_columns"] == {"punsafe": "double", "LICENSE": "string"}
    again = run_import(import_cfg(tmp_path, source, back))
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3

    plan = make_plan(str(back), 8, "punsafe is not null")  # imported columns filter like any other
    assert plan.num_rows == 90 - 3 * 8
    with TokenLoader(plan, rank=0, world=1, micro_batch=4, text_len=8, seed=0, shuffle_buffer=8,
                     embeddings=True) as loader:
        batch = next(loader.batches(0))
    assert batch.image.shape == (4, 0) and batch.image_emb.shape == (4, D) and bool(batch.valid.all())
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", f"tokenize.output={back}"])
    with pytest.raises(DataError, match=r"have no image tokens \(imported from .*export by import-embeddings\); the "
                                        r"autoregressive prior trains on image tokens. Train the diffusion prior"):
        prior_shape(cfg, plan.meta)
    cfg.prior.kind = "diffusion"
    assert prior_shape(cfg, plan.meta).embed_dim == D


def _fs(path):
    from pipeline.storage import commit

    return commit.fs_and_path(path)


def test_a_missing_partition_is_named_and_nothing_is_written(tmp_path, exported):
    _, source = exported
    os.remove(source / "text_emb" / "text_emb_00001.npy")
    out = tmp_path / "imported"
    with pytest.raises(DataError, match=r"partition 1 has no text_emb file \(has .*img_emb_00001.npy, "
                                        r".*metadata_00001.parquet\); embedding-reader would pair"):
        run_import(import_cfg(tmp_path, source, out))
    assert not out.exists()


def test_row_counts_that_disagree_are_named(tmp_path, exported):
    _, source = exported
    path = source / "img_emb" / "img_emb_00002.npy"
    np.save(path, np.load(path)[:-1])
    with pytest.raises(DataError, match=r"partition 2: .*img_emb_00002.npy has 29 rows, .*text_emb_00002.npy 30, "
                                        r".*metadata_00002.parquet 30"):
        run_import(import_cfg(tmp_path, source, tmp_path / "imported"))


def test_mismatched_widths_are_named(tmp_path, exported):
    _, source = exported
    path = source / "text_emb" / "text_emb_00000.npy"
    np.save(path, np.zeros((30, D * 2), np.float16))
    with pytest.raises(DataError, match=r"img_emb_00000.npy holds rows of shape \(16,\), .*text_emb_00000.npy of "
                                        r"\(32,\)"):
        run_import(import_cfg(tmp_path, source, tmp_path / "imported"))


def test_a_layout_without_its_folders_or_captions_is_refused(tmp_path, exported):
    _, source = exported
    with pytest.raises(NotFoundError, match="no img_emb/ folder"):
        run_import(import_cfg(tmp_path, tmp_path / "nowhere", tmp_path / "imported"))
    md = source / "metadata" / "metadata_00000.parquet"
    pq.write_table(pq.read_table(md).drop_columns(["caption"]), md)
    with pytest.raises(DataError, match="metadata_00000.parquet: no caption column 'caption'"):
        run_import(import_cfg(tmp_path, source, tmp_path / "imported2"))


def test_round_trip_through_s3(tmp_path, s3):
    """The export on S3, imported from S3 into token shards on S3 (npy headers read remotely), then filtered."""
    tokens = tmp_path / "tokens"
    write_tokens(tokens, shards=2, n=12)
    export_clip_retrieval(str(tokens), "s3://laion/curate-export")
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "tokenize.output=s3://laion/curate-tokens",
                                            "curate.import_source=s3://laion/curate-export",
                                            "curate.import_clip=ViT-B-32/openai"])
    assert run_import(cfg)["rows"] == 24
    a, _ = schema.read_token_shards(str(tokens))
    b, _ = schema.read_token_shards("s3://laion/curate-tokens")
    assert b.column("key").to_pylist() == a.column("key").to_pylist()
    assert b.column("clip_text_emb").to_pylist() == a.column("clip_text_emb").to_pylist()
    plan = make_plan("s3://laion/curate-tokens", 8, "LICENSE = 'l1'")
    assert plan.num_rows == 8
