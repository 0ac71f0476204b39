"""The checkpoint commit protocol every trainer shares: the pointer, completion records, pruning, resume policy."""

import json

import pytest

from pipeline.errors import CheckpointError
from pipeline.storage.checkpoints import Checkpoints


def test_latest_complete_requires_completion_record(tmp_path):
    assert Checkpoints(str(tmp_path)).latest() is None
    (tmp_path / "step00000010").mkdir()
    (tmp_path / "latest_complete").write_text("step00000010")
    with pytest.raises(CheckpointError, match="has no complete.json"):
        Checkpoints(str(tmp_path)).latest()
    (tmp_path / "step00000010" / "complete.json").write_text("{}")
    assert Checkpoints(str(tmp_path)).latest() == "step00000010"


def test_truncated_checkpoint_file_is_named(tmp_path):
    tag = tmp_path / "step00000004"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (tag / "complete.json").write_text('{"files": {"mp_rank_00_model_states.pt": 100, "rank1.pt": 8}}')
    with pytest.raises(CheckpointError, match="rank1.pt: missing"):
        Checkpoints(str(tmp_path)).verify("step00000004")
    (tag / "rank1.pt").write_bytes(b"y" * 8)
    assert Checkpoints(str(tmp_path)).verify("step00000004")["files"]["rank1.pt"] == 8
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 60)  # torn by a crash or a bad copy
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: 60 bytes, complete.json "
                                                      "recorded 100"):
        Checkpoints(str(tmp_path)).verify("step00000004")


def test_prune_keeps_newest_complete(tmp_path):
    for step, complete in ((1, True), (2, True), (3, False), (4, True), (5, False)):
        (tmp_path / f"step{step:08d}").mkdir()
        if complete:
            (tmp_path / f"step{step:08d}" / "complete.json").write_text("{}")
    (tmp_path / "latest_complete").write_text("step00000004")
    assert sorted(Checkpoints(str(tmp_path)).prune(keep=2)) == ["step00000001", "step00000003"]
    assert Checkpoints(str(tmp_path)).tags() == ["step00000002", "step00000004", "step00000005"]


def _checkpoint(folder, step, complete=True):
    d = folder / f"step{step:08d}"
    d.mkdir(parents=True)
    (d / "weights.pt").write_bytes(b"w" * step)
    if complete:
        (d / "complete.json").write_text(json.dumps({"step": step, "files": {"weights.pt": step}}))


def test_commit_records_every_file_then_the_pointer(tmp_path):
    ckpts = Checkpoints(str(tmp_path))
    (tmp_path / "step00000003" / "sub").mkdir(parents=True)
    (tmp_path / "step00000003" / "a.pt").write_bytes(b"12345")
    (tmp_path / "step00000003" / "sub" / "b.json").write_text("{}")
    assert ckpts.latest() is None
    ckpts.commit("step00000003", 3, world_size=2)
    record = json.loads((tmp_path / "step00000003" / "complete.json").read_text())
    assert record == {"step": 3, "world_size": 2, "files": {"a.pt": 5, "sub/b.json": 2}}
    assert ckpts.latest() == "step00000003" and ckpts.step("step00000003") == 3
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_resume_policies(tmp_path, capsys):
    ckpts = Checkpoints(str(tmp_path), "[t]")
    assert ckpts.resume_tag("auto", "prior.resume") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume and prior.resume=require"):
        ckpts.resume_tag("require", "prior.resume")
    _checkpoint(tmp_path, 2)
    with pytest.raises(CheckpointError, match="pointer is missing; refusing to start from scratch.*prior.output"):
        ckpts.resume_tag("auto", "prior.resume")
    (tmp_path / "latest_complete").write_text("step00000002")
    _checkpoint(tmp_path, 4, complete=False)  # a save that crashed before its completion record
    with pytest.raises(CheckpointError, match="holds checkpoint step00000002 and dvae.resume=never.*dvae.output"):
        ckpts.resume_tag("never", "dvae.resume")
    assert ckpts.resume_tag("auto", "prior.resume", rank=1) == "step00000002"
    assert (tmp_path / "step00000004").exists()  # only rank 0 removes anything
    assert ckpts.resume_tag("auto", "prior.resume") == "step00000002"
    assert not (tmp_path / "step00000004").exists() and "[t] removing" in capsys.readouterr().out


def test_clear_removes_checkpoints_and_pointer_only(tmp_path):
    _checkpoint(tmp_path, 1)
    (tmp_path / "latest_complete").write_text("step00000001")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    Checkpoints(str(tmp_path)).clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
