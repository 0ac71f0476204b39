import json

import pytest

from pipeline.storage import commit


def test_claim_run_refuses_changed_settings_and_names_them(tmp_path):
    fs, folder = commit.fs_and_path(str(tmp_path / "out"))
    assert commit.claim_run(fs, folder, "download", {"shard_size": 10, "resize": {"mode": "border"}}) is True
    assert commit.claim_run(fs, folder, "download", {"shard_size": 10, "resize": {"mode": "border"}}) is False
    with pytest.raises(commit.RunMismatchError, match=r"resize.mode: 'border' -> 'no'; shard_size: 10 -> 20"):
        commit.claim_run(fs, folder, "download", {"shard_size": 20, "resize": {"mode": "no"}})
    with pytest.raises(commit.RunMismatchError, match="holds output of stage 'download'"):
        commit.claim_run(fs, folder, "tokenize", {})


def test_only_marked_shards_are_committed(tmp_path):
    fs, folder = commit.fs_and_path(str(tmp_path))
    (tmp_path / "00000.tar").write_bytes(b"data")
    (tmp_path / "00001.tar").write_bytes(b"partial, never marked")
    commit.write_marker(fs, folder, 0, {"rows": 3})
    assert commit.committed_shards(fs, folder) == {0: {"rows": 3}}
    assert json.loads((tmp_path / "00000.done.json").read_text()) == {"rows": 3}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_atomic_write_replaces_whole(tmp_path):
    fs, folder = commit.fs_and_path(str(tmp_path))
    commit.atomic_write(fs, f"{folder}/x", b"one")
    commit.atomic_write(fs, f"{folder}/x", b"two")
    assert (tmp_path / "x").read_bytes() == b"two"
    assert commit.sha256_file(fs, f"{folder}/x") == commit.sha256_file(fs, f"{folder}/x")
