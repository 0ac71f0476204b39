"""Committed image shards are read only as committed: a tar rewritten or truncated after its marker is refused by
every reader (the dVAE's stream, tokenize, evaluation), naming the file."""

import io
import json
import tarfile

import pytest

from pipeline.demo import synth
from pipeline.dvae.data import ShardCache
from pipeline.errors import DataError
from pipeline.storage import commit, shards


def _commit_tar(folder, sid: int, n: int) -> None:
    samples, _ = synth.make_samples(n, 0.1, seed=sid)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, s in enumerate(samples):
            for ext, data in (("png", synth.render_png(s, 16)), ("txt", s.caption.encode()),
                              ("json", json.dumps({"caption": s.caption}).encode())):
                info = tarfile.TarInfo(f"{sid:05d}{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = folder / f"{sid:05d}.tar"
    path.write_bytes(buf.getvalue())
    fs, out = commit.fs_and_path(str(folder))
    files = {path.name: {"bytes": path.stat().st_size, "sha256": commit.sha256_file(fs, str(path))}}
    commit.write_marker(fs, out, sid, {"shard_id": sid, "count": n, "successes": n, "files": files})


def test_a_shard_changed_after_its_commit_is_refused_by_every_reader(tmp_path):
    _commit_tar(tmp_path, 0, 6)
    assert len(shards.read_shard_samples(str(tmp_path), 0)) == 6
    tar = tmp_path / "00000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0x01  # same size: only the hash can tell
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"00000\.tar changed since it was committed \(sha256"):
        shards.read_shard_samples(str(tmp_path), 0)
    with pytest.raises(DataError, match=r"00000\.tar changed since it was committed"):
        ShardCache(str(tmp_path), {0: 6}, 16, capacity=1).samples(0)  # the dVAE's reader
    tar.write_bytes(bytes(data[:5000]))
    with pytest.raises(DataError, match=r"00000\.tar changed since it was committed \(5000 bytes"):
        list(shards.iter_images(str(tmp_path), 16))
