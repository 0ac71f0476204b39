"""After a takedown, the run never takes the rows back: a download resuming into the run marks rows named by URL or
key ``taken_down`` without fetching them, drops an image whose bytes a takedown named after fetching it;
``--retry-failed`` never refetches a taken-down row; tokenize rejects a row the record names."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest
from faultserver import FaultServer
from takedown_run import REPO

from pipeline.config import load_config
from pipeline.demo import synth
from pipeline.download import runs
from pipeline.download.planner import expand_input, plan_shards
from pipeline.download.run import run_download
from pipeline.download.shard import download_shard
from pipeline.forget import record
from pipeline.forget.request import Selectors
from pipeline.forget.run import run_forget
from pipeline.storage import commit, shards
from pipeline.tokenize.worker import DecodeShard

N = 10  # images /p/0.png ... /p/9.png, each different; row 2 answers 503 (transient: a retry-failed candidate)


def _row_path(i: int) -> str:
    return "/status/503" if i == 2 else f"/p/{i}.png"


@pytest.fixture(scope="module")
def web():
    samples, _ = synth.make_samples(N, 0.0, seed=3)
    with FaultServer() as s:
        for i in range(N):
            s.blobs[f"/p/{i}.png"] = (synth.render_png(samples[i], 32), "image/png", {})
        yield s


def _cfg(tmp_path, web):
    lst = tmp_path / "list.parquet"
    pd.DataFrame({"url": [web.url(_row_path(i)) for i in range(N)],
                  "caption": [f"picture {i}" for i in range(N)]}).to_parquet(lst)
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
        f"run_dir={tmp_path / 'run'}", f"download.input={lst}", "download.shard_size=4", "download.retries=0",
        f"download.allowed_addresses=['127.0.0.1:{web.port}']"])


def _codes(cfg) -> dict[str, str]:
    fs, path = commit.fs_and_path(cfg.path("images"))
    out = {}
    for sid, m in commit.committed_shards(fs, path).items():
        t = pq.read_table(commit.shard_file(path, sid, ".parquet", m), columns=["url", "code"]).to_pydict()
        out.update({u: c for u, c in zip(t["url"], t["code"]) if u})
        out.update({f"<{sid}:{i}>": c for i, (u, c) in enumerate(zip(t["url"], t["code"])) if not u})
    return out


@pytest.mark.slow
def test_a_resumed_download_and_retry_failed_refuse_what_was_taken_down(tmp_path, web, ray_cluster):
    cfg = _cfg(tmp_path, web)
    dcfg, images = cfg.download, cfg.path("images")
    plans, _ = plan_shards(dcfg, expand_input(dcfg.input), set(), f"{images}/_plan/first")
    download_shard(dcfg, images, plans[0], 0)  # the run was interrupted after its first shard
    commit.remove(*commit.fs_and_path(f"{images}/_plan"), recursive=True)
    assert runs.retry_candidates(images)[0][0]["url"] == web.url("/status/503")
    ninth = hashlib.sha256(web.blobs["/p/9.png"][0]).hexdigest()
    (tmp_path / "u.txt").write_text("\n".join(web.url(p) for p in ("/p/1.png", "/status/503", "/p/6.png")) + "\n")
    (tmp_path / "s.txt").write_text(ninth + "\n")
    out = run_forget(cfg, {"urls": str(tmp_path / "u.txt"), "sha256": str(tmp_path / "s.txt")})
    assert out["rows_removed"] == 2 and out["rewritten"]["images"] == [0]  # rows 1 and 2 of the one shard
    web.reset_counts()
    summary = run_download(cfg)  # the rest of the list
    assert summary["shards_committed"] == 3 and summary["codes"]["taken_down"] == 4
    assert web.hits["/p/6.png"] == 0 and web.hits["/p/9.png"] == 1  # a URL is never fetched, bytes are dropped
    codes = _codes(cfg)
    assert [c for u, c in codes.items() if u.startswith("http")] == ["ok"] * 6
    assert sorted(c for u, c in codes.items() if u.startswith("<")) == ["taken_down"] * 4  # no URL kept
    got = {s["caption"] for sid in shards.committed_image_shards(images)
           for s in shards.read_shard_samples(images, sid)}
    assert got == {f"picture {i}" for i in (0, 3, 4, 5, 7, 8)}
    assert runs.retry_candidates(images)[0] == []  # the 503 row was taken down: nothing to retry
    again = run_download(load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
        *[f"{k}={v}" for k, v in (("run_dir", tmp_path / "run"), ("download.input", dcfg.input))],
        "download.shard_size=4", "download.retries=0", "download.retry_failed=true",
        f"download.allowed_addresses=['127.0.0.1:{web.port}']"]))
    assert again["this_run"]["shards"] == 0 and web.hits["/status/503"] == 0


def test_tokenize_rejects_a_row_the_takedown_record_names(tmp_path, web):
    cfg = _cfg(tmp_path, web)
    dcfg, images = cfg.download, cfg.path("images")
    plans, _ = plan_shards(dcfg, expand_input(dcfg.input), set(), f"{images}/_plan/first")
    manifest = download_shard(dcfg, images, plans[1], 0)  # rows 4..7, every one ok
    decode = DecodeShard(images, 16, {1: manifest["files"]}, 8, Selectors(keys={"000011"}))
    rows = {k: r for b in decode({"shard_id": 1, "expected": 4}) for k, r in zip(b["key"], b["reject"])}
    assert rows == {"000010": "", "000011": "taken_down: named by a takedown of this run", "000012": "",
                    "000013": ""}  # keys: shard 1, then the row (img2dataset's scheme)
    assert not record.refusals(cfg.path("takedowns"))  # a run without takedowns refuses nothing
