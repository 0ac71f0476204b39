import hashlib
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
    assert commit.sha256_file(fs, f"{folder}/x") == hashlib.sha256(b"two").hexdigest()


def test_join_fingerprint_write_text_remove_and_debris(tmp_path):
    """The small helpers every stage leans on, each with the answer a bug would change."""
    assert commit.join("s3://b/run/", "tokens") == "s3://b/run/tokens"
    assert commit.join("/", "x") == "/x" and commit.join("", "a", "/b/") == "a/b"
    a = commit.fingerprint({"out": tmp_path / "x", "n": 1})  # a Path is fingerprinted by its text
    assert a == commit.fingerprint({"n": 1, "out": str(tmp_path / "x")}) and len(a) == 16
    assert a != commit.fingerprint({"n": 2, "out": str(tmp_path / "x")})
    commit.write_text(str(tmp_path / "t.txt"), "hello")
    assert (tmp_path / "t.txt").read_text() == "hello"
    fs, folder = commit.fs_and_path(str(tmp_path))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(OSError):
        commit.remove(fs, f"{folder}/full")  # not recursive: a non-empty folder stays
    assert (tmp_path / "full" / "f").exists()
    (tmp_path / "00001.parquet.tmp-1234abcd").write_bytes(b"half")
    (tmp_path / "_staging").mkdir()
    removed = commit.clear_debris(fs, folder, ("_staging", "_plan"))
    assert sorted(removed) == [f"{folder}/00001.parquet.tmp-1234abcd", f"{folder}/_staging"]
    assert not (tmp_path / "_staging").exists() and (tmp_path / "full").exists()
