"""Storage is a URL: the workspace, the node cache, the checkpoint commit over S3 (moto), and clear failures."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.errors import CheckpointError, NotFoundError, StorageError
from pipeline.storage.checkpoints import Checkpoints
from pipeline.storage.urls import Workspace, check_writable, join, local_copy, read_json, write_json


def test_join_keeps_the_scheme():
    assert join("s3://b/run", "prior", "step00000001") == "s3://b/run/prior/step00000001"
    assert join("runs/x/", "/dvae") == "runs/x/dvae"


def test_workspace_pushes_and_pulls_through_s3(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / "node-a"))
    url = "s3://laion/urls-test/ws"
    a = Workspace(url, rank=0)
    assert a.remote and a.local.startswith(str(tmp_path / "node-a"))
    os.makedirs(a.at("tb"))
    open(a.at("tb", "events.1"), "w").write("e")
    open(a.at("metrics.jsonl"), "w").write('{"step": 1}\n')
    a.push("metrics.jsonl", "tb", "absent.txt")  # what does not exist is skipped
    assert s3.cat(f"{url}/metrics.jsonl") == b'{"step": 1}\n' and s3.cat(f"{url}/tb/events.1") == b"e"
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / "node-b"))  # another node: nothing local
    b = Workspace(url, rank=0)
    assert not os.path.exists(b.at("metrics.jsonl"))
    assert b.pull("metrics.jsonl", "tb", "absent.txt") == ["metrics.jsonl", "tb"]
    assert open(b.at("tb", "events.1")).read() == "e"


def test_local_workspace_is_the_folder_itself(tmp_path):
    ws = Workspace(str(tmp_path / "out"), rank=3)
    assert ws.local == str(tmp_path / "out") and not ws.remote
    ws.push("x")  # no-ops
    assert ws.pull("x") == []


def test_local_copy_refetches_a_changed_object(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path))
    url = "s3://laion/urls-test/model"
    s3.pipe(f"{url}/weights.bin", b"one")
    first = local_copy(url)
    assert open(os.path.join(first, "weights.bin"), "rb").read() == b"one"
    assert local_copy(url) == first  # cached
    s3.pipe(f"{url}/weights.bin", b"two!")
    s3.invalidate_cache()
    second = local_copy(url)
    assert second != first and open(os.path.join(second, "weights.bin"), "rb").read() == b"two!"
    with pytest.raises(NotFoundError, match="urls-test/nothing"):
        local_copy("s3://laion/urls-test/nothing")


def test_checkpoint_commit_over_s3_counts_every_rank(s3, tmp_path, monkeypatch):
    url = "s3://laion/urls-test/ckpt"
    ckpts = Checkpoints(url)
    for rank in (0, 1):  # two ranks on two nodes, each with its own workspace
        monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / f"node{rank}"))
        ws = Workspace(url, rank)
        os.makedirs(ws.at("step00000005"))
        open(ws.at("step00000005", f"zero_pp_rank_{rank}.pt"), "wb").write(b"x" * (rank + 3))
        ckpts.upload(ws, "step00000005")
        assert not os.path.exists(ws.at("step00000005"))  # the truth is in storage now
    assert ckpts.latest() is None and ckpts.tags() == ["step00000005"] and ckpts.complete() == []
    ckpts.commit("step00000005", 5, 2)
    assert ckpts.latest() == "step00000005" and ckpts.step("step00000005") == 5
    record = ckpts.verify("step00000005")
    assert record["files"] == {"zero_pp_rank_0.pt": 3, "zero_pp_rank_1.pt": 4}
    s3.pipe(f"{url}/step00000005/zero_pp_rank_1.pt", b"short")  # a part rewritten after the commit
    s3.invalidate_cache()
    with pytest.raises(CheckpointError, match="zero_pp_rank_1.pt: 5 bytes, complete.json recorded 4"):
        Checkpoints(url).verify("step00000005")


def test_unwritable_storage_fails_before_work_naming_the_url(s3):
    with pytest.raises(StorageError, match=r"prior.output s3://no-such-bucket/run/prior: cannot write there"):
        check_writable("s3://no-such-bucket/run/prior", "prior.output")
    check_writable("s3://laion/urls-test/ok", "prior.output")  # a writable place leaves nothing behind
    s3.invalidate_cache()
    assert not s3.exists("laion/urls-test/ok") or not s3.ls("laion/urls-test/ok")


def test_json_round_trip(s3):
    write_json("s3://laion/urls-test/a.json", {"b": 1})
    assert read_json("s3://laion/urls-test/a.json") == {"b": 1}
    assert json.loads(s3.cat("laion/urls-test/a.json")) == {"b": 1}


def test_a_bucket_that_vanishes_mid_checkpoint_commits_nothing(s3, tmp_path, monkeypatch):
    """Rank 0 uploaded its part, then the bucket went away: the upload of rank 1 fails naming the checkpoint, no
    commit happens, and once the bucket is back the unfinished tag is not taken for a checkpoint."""
    s3.mkdir("vanishing")
    url = "s3://vanishing/run/prior"
    ckpts = Checkpoints(url)
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / "node0"))
    ws0 = Workspace(url, 0)
    os.makedirs(ws0.at("step00000010"))
    open(ws0.at("step00000010", "zero_pp_rank_0.pt"), "wb").write(b"rank0")
    ckpts.upload(ws0, "step00000010")
    s3.rm("vanishing", recursive=True)
    s3.invalidate_cache()
    monkeypatch.setenv("PIPELINE_SCRATCH", str(tmp_path / "node1"))
    ws1 = Workspace(url, 1)
    os.makedirs(ws1.at("step00000010"))
    open(ws1.at("step00000010", "zero_pp_rank_1.pt"), "wb").write(b"rank1")
    with pytest.raises(StorageError, match=r"s3://vanishing/run/prior/step00000010: upload failed .*bucket"):
        ckpts.upload(ws1, "step00000010")
    s3.mkdir("vanishing")
    s3.invalidate_cache()
    assert Checkpoints(url).latest() is None and Checkpoints(url).complete() == []
