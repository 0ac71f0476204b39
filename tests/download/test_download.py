"""Download on a real local Ray cluster from the loopback server, through img2dataset's own pieces."""

import json
import os

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.download import planner as download
from pipeline.download.run import run_download
from pipeline.storage import commit, shards

pytestmark = pytest.mark.slow


def url_list(tmp_path, server, samples, name="urls.parquet", url_col="url", caption_col="caption", bad=True):
    urls = [server.url(s.index) for s in samples]
    caps = [s.caption for s in samples]
    if bad:
        urls += [f"{server.base_url}/missing/1.png", f"{server.base_url}/garbage/2.png"]
        caps += ["missing", "garbage"]
    df = pd.DataFrame({url_col: urls, caption_col: caps})
    path = tmp_path / name
    if name.endswith(".parquet"):
        df.to_parquet(path)
    elif name.endswith(".csv"):
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return str(path)


def shard_mtimes(out):
    """Every file the run left at the top of its folder (a rerun with nothing to do rewrites none of them)."""
    return {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out) if os.path.isfile(os.path.join(out, p))}


def cfg_for(tmp_path, inp, *extra):
    return load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", f"download.input={inp}",
                                             "download.allow_private_addresses=true", *extra])


def test_download_commits_shards_and_counts_errors(tmp_path, ray_cluster, image_server, tiny_samples):
    samples = tiny_samples[0][:40]
    cfg = cfg_for(tmp_path, url_list(tmp_path, image_server, samples), "download.shard_size=15")
    summary = run_download(cfg)
    assert summary["shards_committed"] == 3 and not summary["shards_failed"]
    assert summary["count"] == 42 and summary["successes"] == 40
    assert summary["failed_to_download"] == 1 and summary["failed_to_resize"] == 1
    assert summary["codes"] == {"ok": 40, "http_4xx": 1, "not_an_image": 1}
    got = list(shards.iter_images(cfg.path("images"), 16))
    assert len(got) == 40 and len({k for k, _, _ in got}) == 40
    assert {c for _, c, _ in got} <= {s.caption for s in samples}
    assert got[0][2].shape == (16, 16, 3)


def test_rerun_skips_committed_and_changed_config_is_refused(tmp_path, ray_cluster, image_server, tiny_samples):
    cfg = cfg_for(tmp_path, url_list(tmp_path, image_server, tiny_samples[0][:20], bad=False))
    run_download(cfg)
    out = cfg.path("images")
    mtimes = shard_mtimes(out)
    before = image_server.requests
    summary = run_download(cfg)
    assert image_server.requests == before, "a rerun fetched again"
    assert shard_mtimes(out) == mtimes
    assert summary["successes"] == 20
    changed = cfg_for(tmp_path, cfg.download.input, "download.shard_size=7")
    with pytest.raises(commit.RunMismatchError, match="shard_size: 50 -> 7"):
        run_download(changed)
    assert shard_mtimes(out) == mtimes


@pytest.mark.parametrize("name", ["laion.csv", "laion.jsonl"])
def test_laion_columns_and_text_formats(tmp_path, ray_cluster, image_server, tiny_samples, name):
    inp = url_list(tmp_path, image_server, tiny_samples[0][:10], name=name, url_col="URL", caption_col="TEXT",
                   bad=False)
    cfg = cfg_for(tmp_path, inp, "download.url_col=URL", "download.caption_col=TEXT")
    assert run_download(cfg)["successes"] == 10
    marker = json.loads((tmp_path / "run" / "images" / "00000.done.json").read_text())
    assert marker["successes"] == 10 and "00000.tar" in marker["files"]


def test_bad_input_names_file_and_reason(tmp_path, image_server, tiny_samples):
    inp = url_list(tmp_path, image_server, tiny_samples[0][:3], bad=False)
    with pytest.raises(download.InputError, match=r"urls.parquet: column .*nope.* not found"):
        download.plan_shards(cfg_for(tmp_path, inp, "download.url_col=nope").download, [inp], set(),
                             str(tmp_path / "tmp"))
    (tmp_path / "list.xlsx").write_text("x")
    with pytest.raises(download.InputError, match="list.xlsx: unsupported URL list format"):
        download.expand_input(str(tmp_path / "list.xlsx"))
    with pytest.raises(download.InputError, match="no such file"):
        download.expand_input(str(tmp_path / "absent.parquet"))
    (tmp_path / "broken.csv").write_text('url,caption\n"unterminated,\n')
    with pytest.raises(download.InputError, match="broken.csv"):
        download.plan_shards(cfg_for(tmp_path, "x").download, [str(tmp_path / "broken.csv")], set(),
                             str(tmp_path / "tmp"))


def test_non_utf8_caption_is_a_row_error_not_a_crash(tmp_path):
    from pipeline.download.shard import check_caption, read_plan

    path = tmp_path / "latin1.csv"
    path.write_bytes(b"url,caption\nhttp://a/1.jpg,fine\nhttp://a/2.jpg,caf\xe9 au lait\n")
    cfg = cfg_for(tmp_path, str(path)).download
    plans, total = download.plan_shards(cfg, [str(path)], set(), str(tmp_path / "plan"))
    rows = read_plan(plans[0].arrow_path)
    assert total == 1 and len(rows) == 2
    assert check_caption(rows[0]["caption"], cfg) is None
    assert check_caption(rows[1]["caption"], cfg).code == "bad_caption"
