"""dvae.filter: a SQL condition over the image shards' metadata (img2dataset's columns and the additional ones)
decides which images the dVAE's stream trains and evaluates on; the run record holds it, so a resume under another
filter is refused."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.download.run import run_download
from pipeline.dvae.train import _images, run_settings
from pipeline.errors import ConfigError, FilterError
from pipeline.storage import shards

N = 24


@pytest.mark.slow
def test_the_dvae_stream_holds_only_the_images_the_filter_keeps(tmp_path, ray_cluster, image_server, tiny_samples):
    samples = tiny_samples[0][:N]
    pq.write_table(pa.table({"url": [image_server.url(s.index) for s in samples], "caption": ["c"] * N,
                             "score": [i / N for i in range(N)]}), tmp_path / "urls.parquet")
    base = [f"run_dir={tmp_path / 'run'}", f"download.input={tmp_path}/urls.parquet",
            "download.allow_private_addresses=true", "download.shard_size=8",
            'download.save_additional_columns=["score"]',
            "dvae.heldout_images=2", "download.dedup_images=false"]
    cfg = load_config("configs/tiny.yaml", [*base, "dvae.filter=score >= 0.5 and original_width > 0"])
    run_download(cfg)
    images = _images(cfg, 0, 1)
    rows = images.stream.take(0, images.train_images)
    score = {(s, r): smp["meta"]["score"] for s in shards.committed_image_shards(cfg.path("images"))
             for r, smp in enumerate(shards.read_shard_samples(cfg.path("images"), s))}
    got = [score[(int(s), int(r))] for s, r in rows]
    assert got and all(x >= 0.5 for x in got) and all(score[h] >= 0.5 for h in images.heldout)
    assert len(got) + len(images.heldout) == sum(x >= 0.5 for x in score.values()) == N // 2
    c = images.selection["counts"]
    assert c["rows"] == N and c["kept"] == N // 2 and c["clauses"][0]["dropped"] == N // 2
    settings = run_settings(cfg, images.counts, 1, {k: images.selection[k] for k in ("filter", "kept_sha256")})
    other = _images(load_config("configs/tiny.yaml", [*base, "dvae.filter=score >= 0.25"]), 0, 1)
    assert run_settings(cfg, other.counts, 1, {k: other.selection[k] for k in ("filter", "kept_sha256")}) != settings
    assert "filter" not in json.dumps(run_settings(cfg, images.counts, 1))  # no filter: the record as before
    with pytest.raises(FilterError, match="unknown column 'punsafe'.*available: .*original_width"):
        _images(load_config("configs/tiny.yaml", [*base, "dvae.filter=punsafe < 0.1"]), 0, 1)


def test_a_dvae_filter_with_a_syntax_error_stops_the_config(tmp_path):
    with pytest.raises(ConfigError, match="config key 'dvae.filter': syntax error"):
        load_config("configs/tiny.yaml", [f"run_dir={tmp_path}", "dvae.filter=score >= and 1"])
