"""The report's overview from real shards: headline figures per stage (the rest in report.json), throughput, a grid of
downloaded images with captions, the dVAE codebook usage and CLIP-similarity histograms; rendered in headless
Chromium with every picture loaded."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from browser import find_chromium, render_check
from PIL import Image
from tokenshards import META, token_rows

from pipeline.demo import synth
from pipeline.report import overview
from pipeline.report.html import write_html
from pipeline.report.markdown import write_markdown
from pipeline.storage import commit, shards
from pipeline.tokenize.writer import write_token_shard

STAGES = {"download": {"wall_s": 2.0, "successes": 10, "failed": 2, "http_requests": 12, "bytes": 1234},
          "tokenize": {"wall_s": 4.0, "rows": 10, "rejected": 0, "shards": 2, "rows_per_s": 2.5},
          "train-dvae": {"wall_s": 8.0, "heldout_mse": 0.012, "perplexity": 9.5, "codes_used": 12, "train_images": 8,
                         "final_loss": 0.5, "ranks": 1, "zero_stage": 0}}


def _image_shards(folder, n: int, per_shard: int) -> None:
    samples, _ = synth.make_samples(n, 0.1, seed=0)
    fs, path = commit.fs_and_path(str(folder))
    folder.mkdir(parents=True)
    for sid, start in enumerate(range(0, n, per_shard)):
        chunk = samples[start:start + per_shard]
        with tarfile.open(f"{path}/{sid:05d}.tar", "w") as tar:
            for s in chunk:
                key = f"{sid:05d}{s.index:04d}"
                for ext, data in (("png", synth.render_png(s, 16)), ("txt", s.caption.encode()),
                                  ("json", json.dumps({"key": key, "caption": s.caption}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        commit.write_marker(fs, path, sid, {"shard_id": sid, "count": len(chunk), "successes": len(chunk)})


def test_overview_from_real_shards_renders_in_the_browser(tmp_path):
    images, tokens, out = tmp_path / "images", tmp_path / "tokens", tmp_path / "report"
    out.mkdir()
    _image_shards(images, 10, 6)
    for sid, n in ((0, 7), (1, 5)):
        write_token_shard(str(tokens), sid, token_rows(sid, n, seed=sid), META)

    shown = overview.image_grid(str(images), str(out / "dataset_grid.png"), n=8)
    stored = {s["key"]: s["caption"] for sid in shards.committed_image_shards(str(images))
              for s in shards.read_shard_samples(str(images), sid)}
    assert len(shown["keys"]) == 8 and all(stored[k] == c for k, c in zip(shown["keys"], shown["captions"]))
    assert Image.open(out / "dataset_grid.png").size == (6 * 100, 2 * 152)  # 8 images: 6 per row, 2 rows

    hist = overview.token_histograms(str(tokens), 8192, str(out))
    rows = [token_rows(0, 7, 0), token_rows(1, 5, 1)]
    codes = np.concatenate([r["image_tokens"].ravel() for r in rows])
    assert sum(hist["clip_similarity"]["counts"]) == hist["clip_similarity"]["rows"] == 12
    assert sum(hist["codebook"]["counts"]) == hist["codebook"]["tokens"] == 12 * 16 == codes.size
    assert hist["codebook"]["codes_used"] == len(set(codes.tolist()))
    assert hist["codebook"]["counts"][int(codes[0])] == int((codes == codes[0]).sum())
    sims = np.concatenate([r["clip_similarity"] for r in rows])
    assert hist["clip_similarity"]["mean"] == pytest.approx(float(sims.mean()), rel=1e-5)

    heads, rates = overview.headlines(STAGES), overview.throughput(STAGES)
    assert heads["train-dvae"] == {"train_images": 8, "final_loss": 0.5, "heldout_mse": 0.012, "perplexity": 9.5}
    assert heads["download"] == {"successes": 10, "failed": 2}  # a few figures, not every key
    assert rates["download"] == {"wall_s": 2.0, "count": 10, "what": "images downloaded", "per_s": 5.0}
    assert rates["tokenize"]["per_s"] == 2.5 and rates["train-dvae"]["what"] == "images trained on"
    assert rates["train-dvae"]["per_s"] == 1.0

    facts = {"headlines": heads, "throughput": rates, "dataset_grid": shown, **hist}
    figures = {"Downloaded images and their captions": "dataset_grid.png",
               "dVAE codebook usage": "codebook_usage.png", "CLIP similarity": "clip_similarity.png"}
    scores = {k: 0.5 for k in ("match", "chance", "position_match", "position_chance", "colour_and_position_match",
                               "match_before_rerank")}
    write_markdown(str(out), STAGES, scores, figures, overview=facts)
    md = (out / "report.md").read_text()
    assert "| download | 2.0 | **successes** 10 · **failed** 2 |" in md and "http_requests" not in md
    assert "| download | 10 images downloaded | 5 |" in md
    record = json.loads((out / "report.json").read_text())
    assert record["stages"]["download"]["http_requests"] == 12  # the full figures stay in report.json
    assert record["overview"]["clip_similarity"]["counts"] == hist["clip_similarity"]["counts"]

    try:
        find_chromium()
    except FileNotFoundError as e:  # never a skip: CI must provide the browser
        pytest.fail(f"{e} (the headless-browser check of report.html needs it)", pytrace=False)
    res = render_check(write_html(str(out)), str(tmp_path / "shot.png"), timeout_s=60)
    assert res["images"] == 3 and res["loaded"] == 3 and res["broken"] == [], res


def test_the_run_report_has_the_overview(tmp_path):
    """write_run_report over a run's real folders: the grid's keys are rows of the image shards, the histograms
    count every token row, the stage table holds headline figures only."""
    from pipeline.config import load_config
    from pipeline.dvae.data import load_image_array
    from pipeline.dvae.model import DVAE, DVAEShape, save_dvae
    from pipeline.report.build import write_run_report
    from pipeline.storage.weights import DVAE_FILE

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "download.image_size=16"])
    _image_shards(tmp_path / "run" / "images", 10, 6)
    for sid, n in ((0, 7), (1, 5)):
        write_token_shard(cfg.path("tokens"), sid, token_rows(sid, n, seed=sid), META)
    save_dvae(DVAE(DVAEShape(vocab_size=8192, n_hid=4, group_count=2, n_blk_per_group=1, n_init=8)),
              f"{cfg.path('dvae')}/{DVAE_FILE}")
    (tmp_path / "run" / "dvae" / "metrics.json").write_text(json.dumps({"history": [{"step": 1, "loss": 1.0}]}))
    scores = {k: 0.5 for k in ("match", "chance", "position_match", "position_chance", "colour_and_position_match",
                               "match_before_rerank")}
    images, _, _ = load_image_array(cfg.path("images"), 16, limit=12)
    write_run_report(cfg, {**STAGES, "sample": {"wall_s": 1.0, **scores}}, [], images)
    record = json.loads((tmp_path / "run" / "report" / "report.json").read_text())["overview"]
    keys = {s["key"] for sid in shards.committed_image_shards(cfg.path("images"))
            for s in shards.read_shard_samples(cfg.path("images"), sid)}
    assert len(record["dataset_grid"]["keys"]) == 10 and set(record["dataset_grid"]["keys"]) == keys
    assert sum(record["clip_similarity"]["counts"]) == 12 and sum(record["codebook"]["counts"]) == 12 * 16
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    for name in ("dataset_grid.png", "codebook_usage.png", "clip_similarity.png"):
        assert f"]({name})" in md and (tmp_path / "run" / "report" / name).stat().st_size > 1000
    assert "## Throughput" in md and "| tokenize | 10 rows tokenized | 2.5 |" in md
