"""s3:// input and output against a real S3 server on loopback (moto's server mode), with a failure mid-shard."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from faultserver import FaultServer

from pipeline.config import load_config
from pipeline.download import shard as download_shard
from pipeline.download.planner import expand_input, plan_shards
from pipeline.download.run import run_download
from pipeline.runtime import ray_seam
from pipeline.storage import commit, shards

pytestmark = pytest.mark.slow
BUCKET = "laion"  # made by the s3 fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def web():
    with FaultServer() as s:
        yield s


def put_list(fs, web, name: str, n: int) -> str:
    buf = io.BytesIO()
    pd.DataFrame({"URL": [web.url(f"/img/{i}.jpg") for i in range(n)] + [web.url("/status/404")],
                  "TEXT": [f"picture {i}" for i in range(n)] + ["gone"]}).to_parquet(buf)
    fs.pipe(f"{BUCKET}/{name}", buf.getvalue())
    return f"s3://{BUCKET}/{name}"


def s3_config(tmp_path, web, inp: str, out: str):
    return load_config("configs/tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", f"download.input={inp}", f"download.output={out}", "download.url_col=URL",
        "download.caption_col=TEXT", "download.shard_size=5", f"download.allowed_addresses=['127.0.0.1:{web.port}']"])


def test_s3_input_and_output(tmp_path, ray_cluster, s3, web):
    inp = put_list(s3, web, "lists/part-0.parquet", 11)
    cfg = s3_config(tmp_path, web, inp, f"s3://{BUCKET}/images")
    summary = run_download(cfg)
    assert summary["shards_committed"] == 3 and summary["successes"] == 11 and summary["codes"]["http_4xx"] == 1
    assert s3.exists(f"{BUCKET}/images/00002.done.json") and s3.exists(f"{BUCKET}/images/_summary.json")
    assert not s3.glob(f"{BUCKET}/images/_staging/**/*.tar"), "staging left behind"
    got = list(shards.iter_images(f"s3://{BUCKET}/images", 16))
    assert sorted(c for _, c, _ in got) == sorted(f"picture {i}" for i in range(11))
    again = run_download(cfg)
    assert again["this_run"]["shards"] == 0 and again["successes"] == 11


def test_failure_mid_shard_on_s3_never_looks_committed(tmp_path, s3, web, monkeypatch):
    inp = put_list(s3, web, "lists/part-1.parquet", 4)
    out = f"s3://{BUCKET}/crash"
    cfg = s3_config(tmp_path, web, inp, out).download
    plans, _ = plan_shards(cfg, expand_input(inp), set(), f"{out}/_plan")
    moves = []
    real_move = download_shard._move_into_place

    def crash_after_first_move(fs, src, dst):
        if moves:
            raise OSError("injected: node lost while publishing the shard")
        moves.append(dst)
        real_move(fs, src, dst)

    monkeypatch.setattr(download_shard, "_move_into_place", crash_after_first_move)
    with pytest.raises(OSError, match="injected"):
        download_shard.download_shard(cfg, out, plans[0], attempt=0)
    assert s3.exists(moves[0]), "the first file did reach its final name"
    fs, path = commit.fs_and_path(out)
    assert commit.committed_shards(fs, path) == {}, "a half-published shard looks committed"
    monkeypatch.setattr(download_shard, "_move_into_place", real_move)
    manifest = download_shard.download_shard(cfg, out, plans[0], attempt=1)
    assert manifest["successes"] == 4 and list(commit.committed_shards(fs, path)) == [0]
    assert len(list(shards.iter_images(out, 16))) == 4


def test_tasks_learn_where_s3_is_never_the_keys(monkeypatch):
    """What the seam hands tasks in their runtime_env (stored in the GCS, shown on the dashboard, logged)."""
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t0ken",
               "FSSPEC_S3_SECRET": "s3cr3t", "AWS_SECURITY_TOKEN": "t0ken"}
    where = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
             "AWS_SHARED_CREDENTIALS_FILE": "/etc/aws/credentials", "AWS_PROFILE": "pipeline"}
    for k, v in {**secrets, **where}.items():
        monkeypatch.setenv(k, v)
    env = ray_seam.storage_env()["runtime_env"]["env_vars"]
    assert {k: env[k] for k in where} == where
    assert not set(env) & set(secrets) and not {"s3cr3t", "t0ken", "AKIAEXAMPLE"} & set(env.values())
