"""What the download writes without importing img2dataset is what img2dataset's own pieces write: keys, shard files,
X-Robots-Tag answers; and rows reach the writer in key order, duplicates naming the run-wide owner."""

from __future__ import annotations

import io
import json
import tarfile
from email.message import Message

import pyarrow.parquet as pq
import pytest
from img2dataset.downloader import compute_key, is_disallowed
from img2dataset.writer import ParquetSampleWriter, WebDatasetSampleWriter

from pipeline.download.fetch import is_disallowed as ours_disallowed
from pipeline.download.shard import META_SCHEMA, Outcome, _Sink
from pipeline.download.writer import ShardWriter, sample_key


@pytest.mark.parametrize("row,shard,oom_rows,oom_shards", [(0, 0, 3, 5), (7, 12, 3, 5), (999, 99999, 3, 5),
                                                             (5, 3, 1, 5), (42, 7, 4, 2), (0, 123, 2, 2)])
def test_keys_are_img2datasets(row, shard, oom_rows, oom_shards):
    assert sample_key(row, shard, oom_rows, oom_shards) == compute_key(row, shard, oom_rows, oom_shards)


@pytest.mark.parametrize("values", [[], ["noai"], ["NoImageAI"], ["noindex, noai"], ["img2dataset: noai"],
                                    ["otherbot: noai"], ["noindex", "img2dataset: noimageai"], ["Img2Dataset:noai"],
                                    ["otherbot: noai", "noimageai"], ["noarchive"], ["a: b: noai"]])
def test_opt_out_answers_are_img2datasets(values):
    headers = Message()
    for v in values:
        headers["X-Robots-Tag"] = v
    directives = frozenset({"noai", "noimageai"})
    assert ours_disallowed(headers, "img2dataset", directives) == is_disallowed(headers, "img2dataset", directives)


def _rows():
    base = {name: None for name in META_SCHEMA.names}
    out = []
    for i, (img, code) in enumerate([(b"\xff\xd8jpegbytes-0", "ok"), (None, "http_4xx"), (b"\xff\xd8other", "ok"),
                                     (None, "duplicate_url")]):
        meta = dict(base, key=f"00000000{i}", url=f"http://x/{i}.jpg", caption=f"caption {i}" if i != 2 else None,
                    status="success" if code == "ok" else "failed_to_download", code=code, width=8 if img else None,
                    fetch_seconds=0.5, http_status=200)
        out.append((img, meta["key"], meta["caption"], meta))
    return out


def _tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.mode, m.uname, m.gname, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_shard_files_match_img2datasets_writers(tmp_path, fmt):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    writer = ShardWriter(fmt, str(ours), 3, META_SCHEMA, "jpg")
    cls = WebDatasetSampleWriter if fmt == "webdataset" else ParquetSampleWriter
    peer = cls(3, str(theirs), True, 5, META_SCHEMA, "jpg")
    for img, key, caption, meta in _rows():
        writer.write(img, key, caption, dict(meta))
        peer.write(img, key, caption, dict(meta))
    writer.close(), peer.close()
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    a, b = pq.read_table(ours / "00003.parquet"), pq.read_table(theirs / "00003.parquet")
    assert a.schema.equals(b.schema) and a.to_pylist() == b.to_pylist()
    if fmt == "webdataset":
        mine, peers = _tar_members(ours / "00003.tar"), _tar_members(theirs / "00003.tar")
        assert [m[:4] for m in mine] == [m[:4] for m in peers]
        for (name, *_, x), (_, *_, y) in zip(mine, peers):
            assert (json.loads(x), name) == (json.loads(y), name) if name.endswith(".json") else x == y


class _Registry:
    def __init__(self, owners):
        self.owner, self.calls = dict(owners), []

    def __call__(self, pairs):
        self.calls.append(list(pairs))
        return {sha: self.owner.setdefault(sha, key) for sha, key in pairs}


class _Recorder:
    def __init__(self):
        self.rows = []

    def write(self, image, key, caption, meta):
        self.rows.append((key, meta["code"], meta["duplicate_of"], image is not None))


def test_rows_go_out_in_key_order_as_they_land_and_duplicates_name_the_run_wide_owner():
    n = 6
    keys = [f"k{i}" for i in range(n)]
    rows = [{"url": f"u{i}", "caption": "c"} for i in range(n)]
    sha = ["s0", "s1", "s0", "s2", "s1", "s3"]  # s1 already belongs to another shard's key
    outcomes: list[Outcome | None] = [None] * n
    registry, out = _Registry({"s1": "other-shard-key"}), _Recorder()
    sink = _Sink(out, rows, keys, outcomes, registry)
    seen = []
    for i in [5, 3, 1, 0, 4, 2]:  # fetches land out of order
        outcomes[i] = Outcome("ok", data=b"x", meta={"sha256": sha[i]})
        sink.advance()
        seen.append(len(out.rows))
    sink.advance(final=True)
    assert seen[:3] == [0, 0, 0], "nothing is written before the first row has landed"
    assert [r[0] for r in out.rows] == keys
    assert out.rows == [("k0", "ok", None, True), ("k1", "duplicate_image", "other-shard-key", False),
                        ("k2", "duplicate_image", "k0", False), ("k3", "ok", None, True),
                        ("k4", "duplicate_image", "other-shard-key", False), ("k5", "ok", None, True)]
    assert sorted(p for call in registry.calls for p in call) == sorted([("s0", "k0"), ("s1", "k1"), ("s2", "k3"),
                                                                        ("s3", "k5")])
    assert all(o.data is None for o in outcomes), "written rows keep no image bytes"


def test_without_the_registry_rows_are_written_as_soon_as_they_can_be():
    outcomes: list[Outcome | None] = [None, None]
    out = _Recorder()
    sink = _Sink(out, [{"url": "a"}, {"url": "b"}], ["k0", "k1"], outcomes, None)
    outcomes[0] = Outcome("ok", data=b"x", meta={"sha256": "s"})
    sink.advance()
    assert [r[0] for r in out.rows] == ["k0"]
    outcomes[1] = Outcome("ok", data=b"x", meta={"sha256": "s"})
    sink.advance(final=True)
    assert [r[1] for r in out.rows] == ["ok", "ok"], "dedup_images off: identical bytes both kept"


def test_parquet_output_holds_the_image_bytes(tmp_path):
    writer = ShardWriter("parquet", str(tmp_path), 0, META_SCHEMA, "webp")
    for img, key, caption, meta in _rows():
        writer.write(img, key, caption, meta)
    writer.close()
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.column_names[-1] == "webp" and table.column("webp").to_pylist()[0] == b"\xff\xd8jpegbytes-0"
    assert not (tmp_path / "00000.tar").exists()
    with pytest.raises(ValueError, match="unknown output format"):
        ShardWriter("tfrecord", str(tmp_path), 1, META_SCHEMA, "jpg")


def test_tar_reads_back_with_the_storage_reader(tmp_path):
    from pipeline.storage import shards

    writer = ShardWriter("webdataset", str(tmp_path), 0, META_SCHEMA, "jpg")
    for img, key, caption, meta in _rows():
        writer.write(img, key, caption, meta)
    writer.close()
    got = shards.read_shard_samples(str(tmp_path), 0)
    assert [(s["key"], s["image"], s["caption"]) for s in got] == [
        ("000000000", b"\xff\xd8jpegbytes-0", "caption 0"), ("000000002", b"\xff\xd8other", "")]
    assert io.BytesIO(got[0]["image"]).read(2) == b"\xff\xd8"


def test_fetch_threads_hand_bodies_to_image_threads_and_hold_a_bounded_number(monkeypatch):
    import threading

    from pipeline.download import shard
    from pipeline.download.fetch import FetchResult

    held, peak, lock = [0], [0], threading.Lock()
    gate = threading.Event()
    fetched = []

    def fake_fetch(url, limits, policy):
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
            fetched.append(url)
        return FetchResult("ok", b"body-" + url.encode(), status=200, attempts=1)

    def slow_image(got, proc, verify=None):
        gate.wait(5)  # the image threads are slow: fetch threads must stop, not pile bodies up
        with lock:
            held[0] -= 1
        return Outcome("ok", data=got.body, meta={"sha256": got.body.decode()})

    monkeypatch.setattr(shard, "fetch", fake_fetch)
    monkeypatch.setattr(shard, "_image", slow_image)
    rows = [{"url": f"u{i}"} for i in range(40)]
    out = shard._fetch_rows(list(range(40)), rows, None, None, None, 4, lambda: None)
    threading.Timer(0.3, gate.set).start()
    got = dict(out)
    assert sorted(got) == list(range(40)) and got[7].data == b"body-u7"
    assert peak[0] <= 4 + shard.IMAGE_THREADS, f"{peak[0]} bodies held at once"


def test_a_failing_image_step_fails_the_shard_without_fetching_the_rest(monkeypatch):
    from pipeline.download import shard
    from pipeline.download.fetch import FetchResult

    calls = []
    monkeypatch.setattr(shard, "fetch", lambda url, *a: calls.append(url) or FetchResult("ok", b"x", attempts=1))

    def boom(got, proc, verify=None):
        raise RuntimeError("decoder crashed")

    monkeypatch.setattr(shard, "_image", boom)
    rows = [{"url": f"u{i}"} for i in range(500)]
    with pytest.raises(RuntimeError, match="decoder crashed"):
        list(shard._fetch_rows(list(range(500)), rows, None, None, None, 2, lambda: None))
    assert len(calls) < 500, "the remaining URLs were cancelled"
