"""Sampling people can look at: top-p, caption resolution, checkpoint loading, CLIP rerank, records.

Everything runs on tiny models: a small prior over CLIP's BPE vocabulary, a tiny dVAE (16 px, 4x4 grid of 16 codes)
and an open_clip CLIP trained for one step in its own folder layout.
"""

import dataclasses
import hashlib
import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.clip import model as clip_lib
from pipeline.clip.train import train_clip
from pipeline.config import ClipConfig, load_config
from pipeline.demo import synth
from pipeline.dvae.model import DVAE, DVAEShape, save_dvae
from pipeline.prior.checkpoints import save_prior
from pipeline.prior.transformer import DalleTransformer, PriorShape, _sample, pad_text
from pipeline.sample import draw as sample_draw
from pipeline.sample import models as sample_models
from pipeline.sample import records as sample_records
from pipeline.sample.run import resolve_captions, run_sample
from pipeline.storage.weights import FORMAT
from pipeline.tokenize import writer as tokenize

BPE_VOCAB, GRID, CODES, TEXT_LEN = 49408, 4, 16, 8
DVAE_SHAPE = DVAEShape(vocab_size=CODES, n_hid=8, group_count=3, n_blk_per_group=1, n_init=16)  # 16 px → 4x4
PRIOR_SHAPE = PriorShape(text_vocab=BPE_VOCAB, text_len=TEXT_LEN, image_vocab=CODES, image_grid=GRID, n_layer=2,
                         n_head=2, n_embd=16)
SMALL = PriorShape(text_vocab=50, text_len=5, image_vocab=16, image_grid=3, n_layer=2, n_head=2, n_embd=16)
SPARSE = PriorShape(text_vocab=50, text_len=5, image_vocab=16, image_grid=4, n_layer=3, n_head=2, n_embd=16,
                    attention=("row", "column", "conv"), conv_kernel=3)


def _sharp(model: DalleTransformer, head: float = 30.0) -> DalleTransformer:
    """Peaked logits (at init they are near uniform, and every filter would keep almost everything)."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.image_head.weight.mul_(head)
        model.text_emb.weight.mul_(20)
    return model.eval()


# --- top-p ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [SMALL, SPARSE], ids=["dense", "sparse"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@pytest.mark.parametrize("top_p,top_k", [(0.7, 0), (0.9, 5)])
def test_top_p_kv_cache_sampling_equals_full_recompute(shape, guidance_scale, top_p, top_k):
    torch.manual_seed(0)
    model = _sharp(DalleTransformer(shape), head=10.0)
    text = pad_text([[1, 2, 3], [4], []], shape.text_len, 50)
    for seed in range(3):
        a = model.generate(text, 1.0, top_k, torch.Generator().manual_seed(seed), guidance_scale, top_p=top_p)
        b = model.generate_uncached(text, 1.0, top_k, torch.Generator().manual_seed(seed), guidance_scale,
                                    top_p=top_p)
        assert torch.equal(a, b) and a.shape == (3, shape.image_len)


def test_top_p_filters_the_nucleus_and_a_tiny_one_keeps_only_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(64, 16) * 3
    for seed in range(5):
        got = _sample(logits, 1.0, 0, torch.Generator().manual_seed(seed), top_p=1e-6)
        assert torch.equal(got, logits.argmax(-1))
    probs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    seen = set(_sample(probs, 1.0, 0, torch.Generator().manual_seed(0), top_p=0.6).tolist())
    assert seen == {0, 1}  # 0.5 alone is short of 0.6; with 0.3 the nucleus reaches it
    assert set(_sample(probs, 1.0, 0, torch.Generator().manual_seed(0), top_p=0.5).tolist()) == {0}
    assert set(_sample(probs, 1.0, 0, torch.Generator().manual_seed(0), top_p=0.81).tolist()) == {0, 1, 2}
    again = _sample(probs, 1.0, 0, torch.Generator().manual_seed(3), top_p=0.9)
    assert torch.equal(again, _sample(probs, 1.0, 0, torch.Generator().manual_seed(3), top_p=0.9))
    # top-p applies after top-k: k = 1 leaves one token, whatever top_p says
    assert set(_sample(probs, 1.0, 1, torch.Generator().manual_seed(0), top_p=0.99).tolist()) == {0}
    with pytest.raises(ValueError, match="top_p"):
        _sample(probs, 1.0, 0, None, top_p=0.0)
    model = _sharp(DalleTransformer(SMALL), head=1.0)
    text = pad_text([[1, 2], [3]], 5, 50)
    greedy = model.generate(text, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.generate(text, generator=torch.Generator().manual_seed(7), top_p=1e-6), greedy)


# --- captions ---------------------------------------------------------------------------------------------------


def test_resolve_captions_reads_files_and_falls_back(tmp_path, caplog):
    f = tmp_path / "captions.txt"
    f.write_text("a red circle on a blue background\n\n   \nsecond caption\n")
    called = []

    def fallback():
        called.append(1)
        return ["h1", "h2", "h3"]

    got = resolve_captions(["first", str(f), ""], fallback, limit=2)
    assert got == ["first", "a red circle on a blue background", "second caption", ""]
    assert not called  # explicit captions: never the held-out ones, never cut to the limit
    assert resolve_captions([], fallback, limit=2) == ["h1", "h2"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.sample.core"):
        assert resolve_captions([str(empty)], fallback, limit=5) == ["h1", "h2", "h3"]
        assert resolve_captions([str(tmp_path / "missing.txt")], fallback, 5) == [
            str(tmp_path / "missing.txt")]
    assert "no non-empty lines" in caplog.text and "looks like a path" in caplog.text


def test_encode_captions_truncates_with_a_warning_naming_the_caption(caplog):
    bpe = clip_lib.open_clip.get_tokenizer("ViT-B-32")
    long = "a small red circle in the top left corner of a big blue background with a yellow border"
    with caplog.at_level(logging.WARNING, logger="pipeline.sample.core"):
        ids, stats = sample_draw.encode_captions(bpe, ["a red circle", "", long], TEXT_LEN)
    assert stats == {"empty_captions": 1, "truncated_captions": 1}
    assert ids[1] == [] and len(ids[2]) == TEXT_LEN and ids[2] == bpe.encode(long)[:TEXT_LEN]
    assert repr(long) in caplog.text and "unconditionally" in caplog.text


# --- tiny models ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    samples, _ = synth.make_samples(32, 0.1, seed=0)
    images = np.stack([np.asarray(synth.render(s, 16)) for s in samples])
    cfg = ClipConfig(embed_dim=16, width=32, layers=1, patch_size=8, context_length=32, steps=2, batch_size=16)
    folder = tmp_path_factory.mktemp("clip")
    train_clip(cfg, images, [s.caption for s in samples], str(folder), seed=0)
    return folder


@pytest.fixture(scope="module")
def models(tiny_clip_dir):
    torch.manual_seed(0)
    prior = _sharp(DalleTransformer(PRIOR_SHAPE), head=5.0)
    dvae = DVAE(DVAE_SHAPE).eval()
    bundle = clip_lib.load_clip(f"local-dir:{tiny_clip_dir}")
    return prior, dvae, bundle


CAPTIONS = ["a red circle on a blue background", "",
            "a small green square in the bottom right corner of a very large white background, drawn carefully",
            "a blue triangle on a yellow background"]


@pytest.fixture(scope="module")
def drawn(models):
    prior, dvae, bundle = models
    return sample_draw.draw(prior, dvae, bundle, CAPTIONS, candidates=5, temperature=1.0, top_k=0, seed=3,
                           batch=8, top_p=0.95, keep=2)


def test_draw_reranks_by_clip_keeps_the_best_and_reports_the_gain(models, drawn):
    _, _, bundle = models
    results, stats = drawn
    assert [r.caption for r in results] == CAPTIONS
    for r in results:
        assert r.candidates.shape == (5, 16, 16, 3) and r.candidates.dtype == np.uint8
        assert sorted(r.draw_index.tolist()) == list(range(5))
        assert np.all(np.diff(r.clip_scores) <= 0)  # best first
        assert r.keep == 2 and len(r.kept) == 2
        # the recorded scores are CLIP's for these very images, so the kept ones are the highest-scored
        fresh = clip_lib.encode_images(bundle, r.candidates) @ clip_lib.encode_texts(bundle, [r.caption])[0]
        np.testing.assert_allclose(fresh, r.clip_scores, atol=1e-5)
        assert fresh[:2].min() >= fresh[2:].max() - 1e-6
    assert stats["empty_captions"] == 1 and stats["truncated_captions"] == 1
    assert stats["top_p"] == 0.95 and stats["keep"] == 2 and stats["samples"] == 20
    best = np.mean([r.clip_scores[0] for r in results])
    first = np.mean([r.clip_scores[list(r.draw_index).index(0)] for r in results])
    assert stats["clip_score_reranked"] == pytest.approx(best, abs=1e-6)
    assert stats["clip_score_first"] == pytest.approx(first, abs=1e-6)
    assert stats["rerank_gain"] == pytest.approx(best - first, abs=1e-6)
    assert stats["clip_score_first"] <= stats["clip_score_reranked"]
    assert stats["clip_score_mean"] <= stats["clip_score_reranked"] + 1e-6


def test_draw_is_deterministic_and_rejects_a_bad_keep(models, drawn):
    prior, dvae, bundle = models
    again, _ = sample_draw.draw(prior, dvae, bundle, CAPTIONS, candidates=5, temperature=1.0, top_k=0, seed=3,
                               batch=8, top_p=0.95, keep=2)
    for a, b in zip(drawn[0], again):
        assert np.array_equal(a.candidates, b.candidates) and np.array_equal(a.draw_index, b.draw_index)
    with pytest.raises(ValueError, match="keep"):
        sample_draw.draw(prior, dvae, bundle, CAPTIONS[:1], candidates=2, temperature=1.0, top_k=0, seed=0, keep=3)


def test_rerank_orders_by_score_and_honours_keep():
    images = np.arange(2 * 4).reshape(2, 4, 1, 1, 1).repeat(3, axis=-1).astype(np.uint8)  # pixel value = id
    scores = np.array([[0.1, 0.4, 0.3, 0.4], [0.9, 0.2, 0.5, 0.1]])
    out = sample_draw.rerank(["a", "b"], images, scores, keep=2)
    assert out[0].draw_index.tolist() == [1, 3, 2, 0]  # ties keep the draw order
    assert out[0].kept[:, 0, 0, 0].tolist() == [1, 3] and out[1].kept[:, 0, 0, 0].tolist() == [4, 6]
    stats = sample_draw.rerank_stats(out)
    assert stats["clip_score_reranked"] == pytest.approx(0.65) and stats["clip_score_first"] == pytest.approx(0.5)
    assert stats["rerank_gain"] == pytest.approx(0.15)


def test_write_samples_records_every_candidate(tmp_path, drawn):
    results, _ = drawn
    settings = {"seed": 3, "temperature": 1.0, "top_k": 0, "top_p": 0.95, "guidance_scale": 1.0,
                "checkpoint": "/x/model.safetensors"}
    summary = sample_records.write_samples(results, str(tmp_path), settings)
    assert summary["sample_images"] == 20 and summary["kept_images"] == 8 and summary["sample_grids"] == 4
    table = pq.read_table(tmp_path / "samples.parquet")
    for col in ("caption", "caption_index", "rank", "kept", "clip_score", "seed", "temperature", "top_k", "top_p",
                "guidance_scale", "image_path", "draw_index", "checkpoint"):
        assert col in table.column_names, col
    rows = table.to_pylist()
    assert len(rows) == 20 and rows == [
        {**r, "clip_score": pytest.approx(r["clip_score"], abs=1e-6), "temperature": pytest.approx(1.0),
         "top_p": pytest.approx(0.95), "guidance_scale": pytest.approx(1.0)}
        for r in json.loads((tmp_path / "samples.json").read_text())]
    for row in rows:
        assert row["kept"] == (row["rank"] < 2) and row["seed"] == 3 and row["top_p"] == pytest.approx(0.95)
        assert row["caption"] == CAPTIONS[row["caption_index"]]
        assert row["image_path"] == f"samples/{row['caption_index']:03d}/{row['rank']}.png"
        res = results[row["caption_index"]]
        assert np.array_equal(np.asarray(Image.open(tmp_path / row["image_path"])), res.candidates[row["rank"]])
        assert row["clip_score"] == pytest.approx(float(res.clip_scores[row["rank"]]), abs=1e-6)
    for idx in range(4):
        grid = Image.open(tmp_path / "samples" / f"{idx:03d}.png")
        assert grid.width >= 5 * sample_records.CELL  # every candidate, not just the kept ones
    with pytest.raises(ValueError, match="top_p"):
        sample_records.write_samples(results, str(tmp_path), {"seed": 0, "temperature": 1.0, "top_k": 0,
                                                          "guidance_scale": 1.0})


# --- loading ----------------------------------------------------------------------------------------------------


def _meta(dvae_path="", clip_arch="", text_vocab=BPE_VOCAB, image_vocab=CODES, grid=GRID):
    return {"grid": grid, "embed_dim": 16, "schema_version": "1", "preprocess": {"image_size": 16},
            "dvae": {"path": dvae_path, "vocab_size": image_vocab},
            "clip": {"arch": clip_arch, "pretrained": ""}, "tokenizer": {"vocab_size": text_vocab}}


def _save_prior(path, meta, kind="ar", shape=PRIOR_SHAPE):
    torch.manual_seed(0)
    model = DalleTransformer(shape)
    save_prior(path, kind, dataclasses.asdict(shape), model.state_dict(), meta, 1)
    return model


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "download.image_size=16", *overrides])


def test_load_sampler_prior_default_and_file(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "run" / "prior" / "model.safetensors")):
        sample_models.load_sampler_prior(cfg)
    ref = _save_prior(str(tmp_path / "run" / "prior" / "model.safetensors"), _meta())
    model, meta, source = sample_models.load_sampler_prior(cfg)
    assert source == str(tmp_path / "run" / "prior" / "model.safetensors") and meta["grid"] == GRID
    assert not model.training and torch.equal(model.image_head.weight, ref.image_head.weight)
    other = tmp_path / "elsewhere" / "weights.safetensors"
    _save_prior(str(other), _meta())
    assert sample_models.load_sampler_prior(_cfg(tmp_path, f"sample.checkpoint={other}"))[2] == str(other)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        sample_models.load_sampler_prior(_cfg(tmp_path, f"sample.checkpoint={tmp_path / 'nope.safetensors'}"))


def test_load_sampler_prior_refuses_a_diffusion_prior_and_junk(tmp_path):
    path = tmp_path / "diffusion.safetensors"
    save_prior(str(path), "diffusion", {"text_vocab": 10, "text_len": 4, "embed_dim": 8}, {}, _meta(), 1)
    with pytest.raises(ValueError, match=rf"{path}.*'diffusion' prior"):
        sample_models.load_sampler_prior(_cfg(tmp_path, f"sample.checkpoint={path}"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{junk}: no {tmp_path / 'junk.json'} beside it"):
        sample_models.load_sampler_prior(_cfg(tmp_path, f"sample.checkpoint={junk}"))
    (tmp_path / "junk.json").write_text(json.dumps({"format": FORMAT, "sha256": hashlib.sha256(b"not").hexdigest()}))
    with pytest.raises(ValueError, match="junk.safetensors: its bytes do not match the sha256 in .*junk.json"):
        sample_models.load_sampler_prior(_cfg(tmp_path, f"sample.checkpoint={junk}"))
    junk.write_bytes(b"not")
    with pytest.raises(ValueError, match="cannot read prior weights"):
        sample_models.load_sampler_prior(_cfg(tmp_path, f"sample.checkpoint={junk}"))
    empty_dir = tmp_path / "step00000002"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="complete.json"):
        sample_models.load_sampler_prior(_cfg(tmp_path, f"sample.checkpoint={empty_dir}"))


def test_sample_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from pipeline.cli import main

    dvae = tmp_path / "dvae.safetensors"
    save_dvae(DVAE(DVAE_SHAPE), str(dvae))
    base = ["sample", f"run_dir={tmp_path / 'run'}", "sample.captions=[a red circle]"]
    assert main([*base, f"sample.checkpoint={dvae}"]) == 2  # a dVAE given as the prior
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {dvae}: a dVAE checkpoint (dvae.safetensors), not a prior's model.safetensors; give the "
                   "prior's weights (<prior>/model.safetensors or a checkpoint folder <prior>/stepNNNNNNNN)"]
    assert main(base) == 2  # no prior trained yet
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "prior/model.safetensors: no prior weights" in err[0]
    prior = _save_prior(str(tmp_path / "prior.safetensors"), _meta())
    with pytest.raises(ValueError, match=r"a 'ar' prior's weights, not a dVAE checkpoint"):
        from pipeline.dvae.model import load_dvae

        load_dvae(str(tmp_path / "prior.safetensors"))
    assert prior is not None


def test_load_sampler_prior_refuses_vocabularies_that_disagree(tmp_path):
    path = str(tmp_path / "run" / "prior" / "model.safetensors")
    _save_prior(path, _meta(text_vocab=1000))  # the model's own record disagrees with its shape
    with pytest.raises(ValueError, match="tokenizer vocabulary size mismatch: the model has 49408.*1000"):
        sample_models.load_sampler_prior(_cfg(tmp_path))
    _save_prior(path, _meta())
    (tmp_path / "run" / "dvae").mkdir()
    save_dvae(DVAE(DVAEShape(vocab_size=32, n_hid=8, group_count=3, n_blk_per_group=1, n_init=16)),
              str(tmp_path / "run" / "dvae" / "dvae.safetensors"))
    with pytest.raises(ValueError, match=rf"{path}: dVAE vocabulary size mismatch.*trained with 16.*has 32"):
        sample_models.load_sampler_prior(_cfg(tmp_path))
    save_dvae(DVAE(DVAE_SHAPE), str(tmp_path / "run" / "dvae" / "dvae.safetensors"))
    with pytest.raises(ValueError, match="image token grid mismatch.*trained with 4.*has 8"):
        sample_models.load_sampler_prior(_cfg(tmp_path, "download.image_size=32"))
    assert sample_models.load_sampler_prior(_cfg(tmp_path))[2] == path  # the run's dVAE fits
    rows = 2  # the run's token shards name another tokenizer
    tokenize.write_token_shard(str(tmp_path / "run" / "tokens"), 0, {
        "key": ["a", "b"], "url": [""] * rows, "caption": ["x", "y"], "sha256": [""] * rows, "width": [8] * rows,
        "height": [8] * rows, "text_tokens": [[1], [2]], "image_tokens": np.zeros((rows, GRID * GRID), np.uint16),
        "clip_image_emb": np.zeros((rows, 16), np.float32), "clip_text_emb": np.zeros((rows, 16), np.float32),
        "clip_similarity": np.zeros(rows, np.float32)}, _meta(text_vocab=500))
    with pytest.raises(ValueError, match="tokenizer vocabulary size mismatch.*trained with 49408.*has 500"):
        sample_models.load_sampler_prior(_cfg(tmp_path))


def test_load_sampler_prior_exports_a_deepspeed_checkpoint_folder(tmp_path, monkeypatch):

    prior_dir = tmp_path / "run" / "prior"
    tag_dir = prior_dir / "step00000004"
    tag_dir.mkdir(parents=True)
    (tag_dir / "complete.json").write_text(json.dumps({"files": {}}))
    calls = []

    # A fake export on purpose: this test is about load_sampler_prior's use of it (export a checkpoint folder once,
    # reuse the export, redo it when older than complete.json). The real export_weights over real DeepSpeed
    # checkpoints (ZeRO shards on 2 ranks, equal to the live weights) is tested in tests/prior/test_prior_train.py.
    def fake_export(out, tag=None):
        calls.append((out, tag))
        path = os.path.join(out, tag, "model.safetensors")
        _save_prior(path, _meta())
        return path

    monkeypatch.setattr(sample_models, "export_weights", fake_export)
    for given in (str(tag_dir), str(tag_dir) + "/"):
        model, meta, source = sample_models.load_sampler_prior(_cfg(tmp_path, f"sample.checkpoint={given}"))
        assert source == str(tag_dir / "model.safetensors") and model.shape == PRIOR_SHAPE
    assert calls == [(str(prior_dir), "step00000004")]  # exported once, then the export is reused
    os.utime(tag_dir / "model.json", (1, 1))  # an export older than the checkpoint's complete.json is redone
    sample_models.load_sampler_prior(_cfg(tmp_path, f"sample.checkpoint={tag_dir}"))
    assert len(calls) == 2


# --- the stage --------------------------------------------------------------------------------------------------


def test_sample_stage_writes_grids_records_and_stats(tmp_path, tiny_clip_dir):
    run = tmp_path / "run"
    (run / "dvae").mkdir(parents=True)
    dvae_path = str(run / "dvae" / "dvae.safetensors")
    torch.manual_seed(0)
    save_dvae(DVAE(DVAE_SHAPE), dvae_path)
    _save_prior(str(run / "prior" / "model.safetensors"), _meta(dvae_path, f"local-dir:{tiny_clip_dir}"))
    _, heldout = synth.make_samples(40, 0.1, seed=0)
    (run / "dataset.json").write_text(json.dumps({"heldout_captions": heldout}))
    extra = tmp_path / "more.txt"
    extra.write_text("a purple star on a grey background\n")
    cfg = _cfg(tmp_path, "sample.candidates=3", "sample.keep=2", "sample.top_p=0.9", "sample.num_captions=2")
    summary, results = run_sample(cfg)
    assert [r.caption for r in results] == heldout[:2]
    report = run / "report"
    assert (report / "samples.png").read_bytes()[:4] == b"\x89PNG"
    table = pq.read_table(report / "samples.parquet").to_pylist()
    assert len(table) == 6 and sum(r["kept"] for r in table) == 4
    assert all(r["checkpoint"] == str(run / "prior" / "model.safetensors") for r in table)
    assert (report / "samples" / "001.png").exists() and (report / "samples" / "001" / "2.png").exists()
    assert summary["scored"] == 2 and summary["kept_images"] == 4
    best = np.mean([r["clip_score"] for r in table if r["rank"] == 0])  # the gain, recomputed from the records
    first = np.mean([r["clip_score"] for r in table if r["draw_index"] == 0])
    assert summary["rerank_gain"] == pytest.approx(best - first, abs=1e-5)
    assert summary["checkpoint"] == str(run / "prior" / "model.safetensors") and summary["top_p"] == 0.9
    cfg = _cfg(tmp_path, "sample.candidates=2", f"sample.captions=[{extra}, '']", f"sample.output={tmp_path / 'r2'}")
    summary, results = run_sample(cfg)
    assert [r.caption for r in results] == ["a purple star on a grey background", ""]
    assert summary["empty_captions"] == 1 and summary["captions"] == 2
