"""The download stage end to end on a real local Ray cluster against the fault-injecting server: every row accounted
for with its code, retry-failed, Parquet output, and a Ray worker killed mid-job."""

from __future__ import annotations

import os
import threading
import time

import pandas as pd
import psutil
import pytest
from faultserver import FaultServer, make_tls

from pipeline.config import load_config
from pipeline.download import runs as download_runs
from pipeline.download.run import run_download
from pipeline.storage import commit, shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        yield s


def write_list(tmp_path, rows, name="urls.parquet"):
    path = tmp_path / name
    pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(path)
    return str(path)


def config(tmp_path, server, inp, *extra):
    return load_config("configs/tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", f"download.input={inp}",
        f"download.allowed_addresses=['127.0.0.1:{server.port}']",
        "download.deadline=2", "download.timeout=1", "download.shard_size=8", "download.thread_count=8",
        "download.max_in_flight=2", *extra])


def all_rows(output):
    fs, out = commit.fs_and_path(output)
    rows = []
    for sid in commit.committed_shards(fs, out):
        rows += download_runs.shard_meta(output, sid, ["key", "url", "caption", "code", "fetch_seconds",
                                                       "retry_of", "duplicate_of"]).to_pylist()
    return rows


def test_every_row_ends_with_its_code_and_nothing_hangs(tmp_path, ray_cluster, server):
    s = server.url
    expected = [
        (s("/ok.jpg"), "a photo", "ok"), (s("/ok.png"), "png", "ok"), (s("/rgba.png"), "rgba", "ok"),
        (s("/gray.jpg"), "gray", "ok"), (s("/cmyk.jpg"), "cmyk", "ok"), (s("/flaky/run1"), "flaky", "ok"),
        (s("/ratelimit/run1"), "429", "ok"), (s("/status/404"), "gone", "http_4xx"), (s("/reset"), "reset",
        "connection_reset"), (s("/truncated.jpg"), "cut", "truncated"), (s("/slow.jpg"), "drip", "timeout"),
        (s("/endless"), "endless", "too_large"), (s("/big.jpg"), "big", "too_large"),
        (s("/redirect-loop"), "loop", "redirect_loop"), (s("/redirect?to=http%3A%2F%2F169.254.169.254%2F"), "ssrf",
        "blocked_address"), ("http://10.0.0.1/x.jpg", "private", "blocked_address"), (s("/html"), "html",
        "not_an_image"), (s("/empty"), "empty", "empty_body"), (s("/corrupt.jpg"), "corrupt", "decode_error"),
        (s("/bomb.png"), "bomb", "too_many_pixels"), (s("/noai.jpg"), "opt-out", "opted_out"),
        ("file:///etc/passwd", "file", "bad_url"), (None, "no url", "bad_url"), (s("/ok.jpg"), "again",
        "duplicate_url"), (s("/ok.png?c=1"), "", "empty_caption"),
        (s("/gray.jpg?c=2"), "x" * 5000, "caption_too_long"), (s("/cmyk.jpg?c=3"), "bad \ufffd bytes", "bad_caption"),
    ]
    inp = write_list(tmp_path, [(u, c) for u, c, _ in expected])
    # A 3 s deadline: the 429's Retry-After (1 s) still fits when a busy machine slows the first answer.
    cfg = config(tmp_path, server, inp, "download.dedup_images=false", "download.deadline=3")
    t0 = time.monotonic()
    summary = run_download(cfg)
    assert time.monotonic() - t0 < 90, "the job took far longer than its deadlines allow"
    rows = all_rows(cfg.path("images"))
    assert summary["count"] == len(rows) == len(expected) and not summary["shards_failed"]
    got = [r["code"] for r in sorted(rows, key=lambda r: r["key"])]
    assert got == [c for _, _, c in expected]
    assert max(r["fetch_seconds"] or 0 for r in rows) < 3.5, "a URL ran past its deadline (3 s + slack)"
    dup = next(r for r in rows if r["code"] == "duplicate_url")
    assert dup["duplicate_of"] == min(r["key"] for r in rows if r["url"] == s("/ok.jpg"))
    assert summary["successes"] == len(list(shards.iter_images(cfg.path("images"), 16))) == 7
    assert sum(summary["codes"].values()) == len(expected)


def test_duplicate_images_keep_the_first_key(tmp_path, ray_cluster, server):
    rows = [(server.url("/dup-a.jpg"), "a"), (server.url("/ok.jpg"), "b"), (server.url("/dup-b.jpg"), "c")]
    rows += [(server.url(f"/img/{i}.jpg"), f"same bytes as ok.jpg {i}") for i in range(10)]
    cfg = config(tmp_path, server, write_list(tmp_path, rows), "download.dedup_images=true")
    run_download(cfg)
    got = sorted(all_rows(cfg.path("images")), key=lambda r: r["key"])
    # within a shard the lowest key keeps the image; across shards running at once, the first shard to claim it
    assert [r["code"] for r in got[::2][:2]] == ["ok", "duplicate_image"] and got[2]["duplicate_of"] == got[0]["key"]
    same = [got[1]] + got[3:]
    keeper = [r for r in same if r["code"] == "ok"]
    assert len(keeper) == 1, [r["code"] for r in same]
    assert all(r["duplicate_of"] == keeper[0]["key"] for r in same if r is not keeper[0])


def test_retry_failed_refetches_only_transient_rows_into_new_shards(tmp_path, ray_cluster, server):
    rows = [(server.url(f"/flaky/retry{i}"), f"flaky {i}") for i in range(5)]
    rows += [(server.url("/status/404"), "gone"), (server.url("/ok.jpg"), "fine")]
    cfg = config(tmp_path, server, write_list(tmp_path, rows), "download.retries=0")
    first = run_download(cfg)
    assert first["codes"] == {"http_4xx": 1, "http_5xx": 5, "ok": 1} and first["transient_rows"] == 5
    before = {p: os.path.getmtime(p) for p in (tmp_path / "run" / "images").glob("0000[0]*")}
    cfg.download.retry_failed = True
    second = run_download(cfg)
    assert second["this_run"]["successes"] == 5 and second["shards_committed"] == 2
    got = all_rows(cfg.path("images"))
    assert len({r["key"] for r in got}) == len(got) == 12, "keys must stay unique"
    retried = [r for r in got if r["retry_of"]]
    assert sorted(r["retry_of"] for r in retried) == sorted(r["key"] for r in got if r["code"] == "http_5xx")
    assert all(r["code"] == "ok" for r in retried)
    assert {p: os.path.getmtime(p) for p in before} == before, "retry-failed touched a committed shard"
    third = run_download(cfg)
    assert third["this_run"]["shards"] == 0 and third["shards_committed"] == 2, "nothing is left to retry"


def test_retry_failed_refuses_an_unfinished_run(tmp_path, ray_cluster, server):
    cfg = config(tmp_path, server, write_list(tmp_path, [(server.url("/ok.jpg"), "x")]), "download.retry_failed=true")
    with pytest.raises(RuntimeError, match="not committed yet"):
        run_download(cfg)


def test_parquet_output_format(tmp_path, ray_cluster, server):
    rows = [(server.url(p), p) for p in ("/ok.jpg", "/gray.jpg", "/status/404", "/rgba.png")]
    cfg = config(tmp_path, server, write_list(tmp_path, rows), "download.output_format=parquet")
    summary = run_download(cfg)
    marker = commit.committed_shards(*commit.fs_and_path(cfg.path("images")))[0]
    assert set(marker["files"]) == {"00000.parquet", "00000_stats.json"} and summary["successes"] == 3
    imgs = list(shards.iter_images(cfg.path("images"), 16))
    assert [c for _, c, _ in imgs] == ["/ok.jpg", "/gray.jpg", "/rgba.png"] and imgs[0][2].shape == (16, 16, 3)


def _download_task_pids() -> list[int]:
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray::download_shard" in cmd and "IDLE" not in cmd:
            pids.append(p.pid)
    return pids


def test_killed_worker_loses_and_duplicates_nothing(tmp_path, ray_cluster, server):
    rows = []
    for shard in range(6):  # each shard: one drip past the 1.5 s deadline (keeps tasks busy) and seven images
        rows += [(server.url(f"/slow.jpg?shard={shard}"), "slow")]
        rows += [(server.url(f"/img/{shard}-{i}.jpg"), f"image {shard} {i}") for i in range(7)]
    cfg = config(tmp_path, server, write_list(tmp_path, rows), "download.deadline=1.5", "download.dedup_images=false")
    out = cfg.path("images")
    fs, path = commit.fs_and_path(out)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run_download(cfg)))
    job.start()
    killed, committed_before = None, {}
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline and job.is_alive():
        committed_before = commit.committed_shards(fs, path)
        pids = _download_task_pids()
        if committed_before and pids:
            killed = pids[0]
            psutil.Process(killed).kill()
        time.sleep(0.05)
    job.join(120)
    assert killed is not None, "never caught a shard task running"
    assert not job.is_alive(), "the job hung after a worker was killed"
    # The interrupted run itself: Ray retried the killed task, so it finished every shard, each row once, and
    # left what it had committed before the kill as it was.
    assert result and result["shards_committed"] == 6 and result["shards_failed"] == {}, result
    assert result["count"] == len(rows) and result["this_run"]["shards"] == 6 and "error" not in result["this_run"]
    own = commit.committed_shards(fs, path)
    assert {sid: own[sid]["files"] for sid in committed_before} == {sid: m["files"] for sid, m in
                                                                     committed_before.items()}
    got = all_rows(out)
    assert sorted(r["url"] for r in got) == sorted(u for u, _ in rows), "the interrupted run lost or duplicated keys"
    assert len({r["key"] for r in got}) == len(rows)
    assert not [n for n in os.listdir(out) if ".tmp-" in n or n in ("_staging", "_plan")], "debris left behind"
    again = run_download(cfg)  # the rerun: nothing to do, nothing rewritten
    after = commit.committed_shards(fs, path)
    assert again["this_run"]["shards"] == 0 and after == own, "the rerun rewrote a committed shard"


def test_https_rows_through_the_stage_trust_download_ca_bundle(tmp_path, ray_cluster):
    certs = make_tls(str(tmp_path / "tls"))
    with FaultServer(tls=certs["good"]) as good, FaultServer(tls=certs["untrusted"]) as bad:
        rows = [(good.url("/ok.jpg"), "trusted"), (good.url("/status/404"), "gone"), (bad.url("/ok.jpg"), "untrusted"),
                (good.url("/redirect-chain/2"), "redirected"), (good.url("/ok.png"), "png")]
        cfg = load_config("configs/tiny.yaml", [
            f"run_dir={tmp_path / 'run'}", f"download.input={write_list(tmp_path, rows)}",
            f"download.allowed_addresses=['127.0.0.1:{good.port}', '127.0.0.1:{bad.port}']",
            f"download.ca_bundle={certs['good']['ca']}", "download.deadline=3", "download.timeout=1",
            "download.shard_size=8", "download.thread_count=2", "download.dedup_images=false"])
        summary = run_download(cfg)
        got = [r["code"] for r in sorted(all_rows(cfg.path("images")), key=lambda r: r["key"])]
        assert got == ["ok", "http_4xx", "tls_error", "ok", "ok"]
        assert summary["codes"]["tls_error"] == 1 and summary["transient_rows"] == 0, "tls_error is not transient"
        assert bad.hits["/ok.jpg"] == 0 and bad.connections == 1, "a rejected certificate is not retried"
