"""Diffusion-prior evaluation: held-out rule, cosine and retrieval figures, the grid, and eval_prior end to end."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Config
from pipeline.prior.eval import (
    CELL,
    LABEL_W,
    PAD,
    RetrievalIndex,
    cosine_figures,
    eval_prior,
    evaluate_predictions,
    heldout_mask,
    retrieval_grid,
)
from pipeline.storage import commit, schema
from pipeline.tokenize.writer import write_token_shard

D, GRID, TEXT_VOCAB = 16, 2, 49408
META = {
    "schema_version": schema.SCHEMA_VERSION, "grid": GRID, "embed_dim": D,
    "dvae": {"path": "dvae.safetensors", "sha256": "d" * 64, "vocab_size": 32, "shape": {}},
    "clip": {"arch": "tiny", "pretrained": "", "sha256": "c" * 64},
    "tokenizer": {"id": "open_clip:SimpleTokenizer", "vocab_size": TEXT_VOCAB},
    "preprocess": {"image_size": 16, "dvae_input": "rgb/255", "clip_input": "test"},
}


def unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def token_rows(keys: list[str], img: np.ndarray, txt: np.ndarray, rng: np.random.Generator) -> dict:
    n = len(keys)
    return {"key": keys, "url": [""] * n, "caption": [f"caption of {k}" for k in keys], "sha256": [""] * n,
            "width": [16] * n, "height": [16] * n,
            "text_tokens": [rng.integers(1, 1000, rng.integers(1, 6)).tolist() for _ in range(n)],
            "image_tokens": rng.integers(0, 32, (n, GRID * GRID)), "clip_image_emb": img.astype(np.float16),
            "clip_text_emb": txt.astype(np.float16), "clip_similarity": np.zeros(n, np.float32)}


def write_images(folder, keys: list[str], size: int = 16) -> None:
    """One committed webdataset image shard (key.png + key.txt), like the download stage leaves it."""
    fs, path = commit.fs_and_path(str(folder))
    fs.makedirs(path, exist_ok=True)
    with tarfile.open(f"{path}/00000.tar", "w") as tar:
        for i, key in enumerate(keys):
            buf = io.BytesIO()
            Image.new("RGB", (size, size), (i * 7 % 256, 80, 160)).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", f"caption of {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    commit.write_marker(fs, path, 0, {"shard_id": 0, "successes": len(keys)})


def test_heldout_mask_deterministic_fraction_and_order_independent():
    keys = [f"{s:05d}{i:04d}" for s in range(20) for i in range(1000)]
    m = heldout_mask(keys, 5.0)
    assert m.dtype == bool and m.shape == (20000,)
    assert 0.04 < m.mean() < 0.06
    assert np.array_equal(m, heldout_mask(keys, 5.0))
    perm = np.random.default_rng(0).permutation(len(keys))
    assert np.array_equal(heldout_mask([keys[i] for i in perm], 5.0), m[perm])
    # A row's fate depends on its key alone: any sub-list (a shard, a rank's share) agrees with the whole.
    assert np.array_equal(heldout_mask(keys[7000:7100], 5.0), m[7000:7100])
    assert not heldout_mask(keys, 0.0).any() and heldout_mask(keys, 100.0).all()
    assert (heldout_mask(keys, 5.0) <= heldout_mask(keys, 10.0)).all()  # raising the percent only adds rows


def test_cosine_figures_on_constructed_data():
    rng = np.random.default_rng(0)
    true = unit(rng, 50)
    text = unit(rng, 50)  # unrelated to the image: cosine near 0
    pred = 3.0 * true  # scale must not matter: normalised inside
    f = cosine_figures(pred, true, text, None)
    assert f["cos_pred_image"] == pytest.approx(1.0, abs=1e-5)
    assert abs(f["cos_text_image"]) < 0.2 and f["cos_uncond_image"] is None
    assert f["beats_text_baseline"] is True and f["n"] == 50
    f = cosine_figures(-true, true, text, true)
    assert f["cos_pred_image"] == pytest.approx(-1.0, abs=1e-5) and f["cos_uncond_image"] == pytest.approx(1.0)
    assert f["beats_text_baseline"] is False
    with pytest.raises(ValueError, match="shape"):
        cosine_figures(true[:, :8], true, text, None)


def test_retrieval_returns_own_row_first():
    """Acceptance: given its own image embedding, retrieval returns that image's row first."""
    rng = np.random.default_rng(1)
    emb = unit(rng, 300)
    keys = [f"k{i:04d}" for i in range(300)]
    index = RetrievalIndex(emb.astype(np.float16), keys)
    got, scores = index.search(emb, 5)
    assert [g[0] for g in got] == keys
    assert scores.shape == (300, 5) and np.allclose(scores[:, 0], 1.0, atol=2e-3)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert len(index.search(emb[:2], 1000)[0][0]) == 300  # k beyond the index: every row, no -1 padding
    with pytest.raises(ValueError, match="dimension"):
        index.search(emb[:, :8], 3)


def test_retrieval_index_rejects_bad_rows():
    emb = np.eye(3, 4, dtype=np.float32)
    with pytest.raises(ValueError, match="NaN/inf or zero"):
        RetrievalIndex(np.vstack([emb, np.zeros((1, 4))]), ["a", "b", "c", "zero"])
    with pytest.raises(ValueError, match="expected"):
        RetrievalIndex(emb, ["a", "b"])


def test_from_tokens_skips_nan_and_zero_rows(tmp_path):
    rng = np.random.default_rng(2)
    img = unit(rng, 20)
    img[3] = np.nan
    img[7] = 0.0
    keys = [f"00000{i:04d}" for i in range(20)]
    write_token_shard(str(tmp_path / "tokens"), 0, token_rows(keys, img, unit(rng, 20), rng), META)
    index = RetrievalIndex.from_tokens(str(tmp_path / "tokens"))
    assert index.skipped == 2 and len(index) == 18
    assert keys[3] not in index.keys and keys[7] not in index.keys
    got, _ = index.search(img[[0, 19]], 1)
    assert got == [[keys[0]], [keys[19]]]


def test_from_tokens_names_shard_without_embeddings(tmp_path):
    import pyarrow.parquet as pq

    folder = tmp_path / "tokens"
    rng = np.random.default_rng(3)
    write_token_shard(str(folder), 0, token_rows(["a", "b"], unit(rng, 2), unit(rng, 2), rng), META)
    p = folder / "00000.parquet"
    pq.write_table(pq.read_table(p).drop_columns(["clip_image_emb"]), p)
    with pytest.raises(ValueError, match=r"00000\.parquet.*clip_image_emb"):
        RetrievalIndex.from_tokens(str(folder))


def test_retrieval_grid_size_and_outline(tmp_path):
    images = {f"k{i}": np.full((16, 16, 3), 40 * i, np.uint8) for i in range(4)}
    neighbours = [["k0", "k1", "k2"], ["k3", "missing", "k1"]]
    path = retrieval_grid(["a red square on a blue background " * 3, "b"], neighbours, images,
                          str(tmp_path / "sub" / "grid.png"), truth=["k1", "nothere"])
    img = Image.open(path)
    assert img.size == (LABEL_W + 3 * (CELL + PAD) + PAD, 2 * (CELL + PAD) + PAD)
    px = np.asarray(img)
    x = LABEL_W + 1 * (CELL + PAD)  # row 0's truth k1 sits in column 1: green outline
    assert tuple(px[PAD + CELL // 2, x]) == (0, 200, 0)
    assert tuple(px[PAD + CELL // 2, LABEL_W]) != (0, 200, 0)  # column 0 is not the truth
    assert tuple(px[PAD + CELL + PAD + 2, LABEL_W + CELL + PAD + 2]) == (160, 160, 160)  # missing: gray placeholder
    assert not list(tmp_path.joinpath("sub").glob("*.tmp*"))


def test_evaluate_predictions_recall():
    rng = np.random.default_rng(4)
    n = 40
    img = unit(rng, n)
    keys = [f"k{i:03d}" for i in range(n)]
    index = RetrievalIndex(img, keys)
    text = unit(rng, n)  # unrelated to the images: the text baseline retrieves by chance
    pred = img.copy()
    pred[:10] = img[(np.arange(10) + 1) % n]  # 10 of 40 point at another image: recall@1 = 0.75
    f = evaluate_predictions(keys, [""] * n, pred, img, text, None, index, k=5)
    assert f["recall_at_1"] == pytest.approx(0.75)
    assert 0.75 <= f["recall_at_k"] <= 1.0
    assert f["text_recall_at_1"] < 0.2 and f["chance_recall_at_k"] == pytest.approx(5 / 40)
    assert f["beats_text_baseline"] and "uncond_recall_at_1" not in f and f["truth_not_indexed"] == 0
    assert [nb[0] for nb in f["neighbours"][10:]] == keys[10:]
    f = evaluate_predictions(keys, [""] * n, img, img, text, img, RetrievalIndex(img[1:], keys[1:]), k=1)
    assert f["truth_not_indexed"] == 1 and f["recall_at_1"] == pytest.approx(39 / 40)
    assert f["uncond_recall_at_1"] == pytest.approx(39 / 40)


@pytest.fixture
def run(tmp_path):
    """Two committed token shards (120 rows, two with broken image embeddings) and an image shard for 100 of them."""
    rng = np.random.default_rng(5)
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.prior.heldout_percent = 20.0  # the key may not exist in PriorConfig yet; eval_prior reads it with getattr
    keys = [f"{s:05d}{i:04d}" for s in range(2) for i in range(60)]
    img, txt = unit(rng, 120), unit(rng, 120)
    img[5], img[70] = np.nan, 0.0
    for s in range(2):
        sl = slice(60 * s, 60 * (s + 1))
        write_token_shard(cfg.path("tokens"), s, token_rows(keys[sl], img[sl], txt[sl], rng), META)
    write_images(cfg.path("images"), keys[:100])
    truth = {f"caption of {k}": img[i] for i, k in enumerate(keys)}
    return cfg, keys, truth


def test_eval_prior_end_to_end_with_stub(run):
    """A stub predictor on purpose: its answers are known (near-perfect conditional, constant unconditional), so
    every figure has a right value to check (recall@1 = 1, uncond far worse); a trained tiny prior's figures have no
    known value. eval-prior with a real prior checkpoint runs in tests/demo/test_e2e.py."""
    cfg, keys, truth = run
    calls = []

    def predict(captions, tokens, text_emb, scale):
        calls.append((scale, tokens, text_emb))
        if scale == 0.0:  # unconditional: the same embedding for every caption
            return np.tile(np.ones(D, np.float32), (len(captions), 1))
        return np.stack([truth[c] for c in captions]) + 0.01  # a near-perfect prior

    res = eval_prior(cfg, predict=predict, limit=256)
    held = heldout_mask(keys, 20.0)
    assert res["heldout_rows"] == int(held.sum()) > 0
    assert res["evaluated"] + res["heldout_bad_embeddings"] == res["heldout_rows"]
    assert [c[0] for c in calls] == [cfg.sample.guidance_scale, 0.0]
    tokens = calls[0][1]
    assert tokens.dtype == np.int64 and tokens.shape == (res["evaluated"], cfg.prior.text_len)
    assert (tokens[:, -1] == TEXT_VOCAB + cfg.prior.text_len - 1).all()  # per-position pads
    assert calls[0][2].dtype == np.float32 and calls[0][2].shape == (res["evaluated"], D)
    assert res["recall_at_1"] == 1.0 and res["beats_text_baseline"] and res["cos_pred_image"] > 0.99
    assert res["cos_uncond_image"] < 0.5 and res["text_recall_at_1"] < 0.5
    assert res["index_rows"] == 118 and res["index_skipped"] == 2
    saved = json.loads(open(res["eval_json"]).read())
    assert saved["recall_at_1"] == 1.0 and saved["retrieval_png"] == res["retrieval_png"]
    n = min(8, res["evaluated"])
    assert Image.open(res["retrieval_png"]).size == (LABEL_W + 5 * (CELL + PAD) + PAD, n * (CELL + PAD) + PAD)
    # images exist for keys[:100] only: any neighbour beyond is recorded as missing (drawn as a placeholder)
    shown = {k for ex in saved["examples"] for k in ex["neighbours"]}
    assert saved["missing_images"] == sorted(k for k in shown if k not in keys[:100])
    # limit: the first rows by key, the same figures on a rerun
    small = eval_prior(cfg, predict=predict, limit=3)
    assert small["evaluated"] == 3 and [e["key"] for e in small["examples"]] == [e["key"] for e in
                                                                                  saved["examples"]][:3]


def test_eval_prior_errors(run, tmp_path):
    cfg, _, _ = run
    cfg.prior.heldout_percent = 0.0
    with pytest.raises(ValueError, match="no held-out rows.*heldout_percent"):
        eval_prior(cfg, predict=lambda c, t, e, s: e)
    cfg.prior.heldout_percent = 20.0
    with pytest.raises(ValueError, match="expected"):
        eval_prior(cfg, predict=lambda c, t, e, s: e[:, :8])
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        eval_prior(cfg)  # no predict and no checkpoint
