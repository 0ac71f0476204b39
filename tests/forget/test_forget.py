"""forget: rows named by key, URL or image sha256 leave every image shard, token shard, side table and export
partition of the run, each affected shard rewritten as its next generation; untouched shards stay bitwise equal;
the takedown record names what matched; bad lists change nothing."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from takedown_run import checksums, key, make_run, sha, url

from pipeline.errors import InputError, PipelineError
from pipeline.forget.run import run_forget
from pipeline.storage import commit, schema, shards
from pipeline.storage.lease import Lease


def _list(tmp_path, name: str, lines: list[str]) -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def image_keys(cfg) -> dict[int, set[str]]:
    folder = cfg.path("images")
    return {s: {x["key"] for x in shards.read_shard_samples(folder, s)} for s in shards.committed_image_shards(folder)}


def token_keys(cfg) -> set[str]:
    table, _ = schema.read_token_shards(cfg.path("tokens"), ["key"])
    return set(table.column("key").to_pylist())


def export_keys(cfg) -> set[str]:
    out = set()
    root = cfg.path("clip_retrieval")
    for name in sorted(os.listdir(f"{root}/metadata")):
        t = pq.read_table(f"{root}/metadata/{name}")
        n = t.num_rows
        sid = name[len("metadata_"):-len(".parquet")]
        assert len(np.load(f"{root}/img_emb/img_emb_{sid}.npy")) == n  # partitions stay aligned
        assert len(np.load(f"{root}/text_emb/text_emb_{sid}.npy")) == n
        out |= set(t.column("key").to_pylist())
    return out


def side_rows(cfg) -> dict[str, str | None]:
    folder = commit.join(cfg.path("tokens"), "_dedup")
    fs, path = commit.fs_and_path(folder)
    out = {}
    for sid, m in commit.committed_shards(fs, path).items():
        p = commit.shard_file(path, sid, ".parquet", m)
        schema.verify_token_shard(fs, p, m)
        with fs.open(p, "rb") as f:
            t = pq.read_table(f).to_pydict()
        out.update(zip(t["key"], t["duplicate_of"]))
    return out


def shard_files(cfg, sid: int) -> dict[str, str]:
    """Checksums of every file of shard ``sid`` in the run's shard folders and its export partition."""
    return {k: v for k, v in checksums(cfg.path("images"), cfg.path("tokens"), cfg.path("clip_retrieval")).items()
            if f"{sid:05d}" in k.split("@")[0]}


@pytest.mark.parametrize("selector", ["keys", "urls", "sha256"])
def test_each_selector_removes_the_row_everywhere_and_leaves_other_shards_bitwise_equal(tmp_path, selector):
    cfg = make_run(str(tmp_path / "run"))
    before0, before2 = shard_files(cfg, 0), shard_files(cfg, 2)
    value = {"keys": key(1, 3), "urls": url(1, 3), "sha256": sha(1, 3)}[selector]
    out = run_forget(cfg, {selector: _list(tmp_path, "list.txt", ["# takedown", value, ""])})
    assert out["rows_removed"] == 1 and out["rewritten"] == {k: [1] for k in ("images", "tokens", "dedup", "export")}
    assert key(1, 3) not in image_keys(cfg)[1] and len(image_keys(cfg)[1]) == 6
    assert key(1, 3) not in token_keys(cfg) and len(token_keys(cfg)) == 17
    assert key(1, 3) not in export_keys(cfg) and len(export_keys(cfg)) == 17
    assert key(1, 3) not in side_rows(cfg)
    assert shard_files(cfg, 0) == before0 and shard_files(cfg, 2) == before2  # untouched: bitwise equal
    # the image shard keeps one metadata row per input row: the removed one with its key only
    fs, path = commit.fs_and_path(cfg.path("images"))
    marker = commit.read_marker(fs, path, 1)
    assert marker["generation"] == 1 and marker["successes"] == 6 and marker["codes"]["taken_down"] == 1
    meta = pq.read_table(commit.shard_file(path, 1, ".parquet", marker)).to_pylist()
    gone = next(r for r in meta if r["key"] == key(1, 3))
    assert gone["code"] == "taken_down" and gone["url"] is None and gone["sha256"] is None and gone["caption"] is None
    assert sorted(os.listdir(path)) == sorted(set(os.listdir(path)) - {"00001.tar", "00001.parquet"})  # old gone
    rec = json.loads(open(out["record"]).read())
    assert rec["keys_removed"] == [key(1, 3)] and {r["kind"] for r in rec["receipts"]} == {
        "images", "tokens", "dedup", "export"}
    img = next(r for r in rec["receipts"] if r["kind"] == "images")
    assert img["old"]["00001.tar"] != img["new"]["00001.g1.tar"] and img["old_generation"] == 0
    assert sha(1, 3) in rec["refuse"]["sha256"]  # a key's row refuses its URL and bytes too


def test_a_removed_first_copy_hands_its_group_to_the_earliest_copy_left(tmp_path):
    cfg = make_run(str(tmp_path / "run"))
    run_forget(cfg, {"keys": _list(tmp_path, "k.txt", [key(0, 0)])})
    rows = side_rows(cfg)
    assert key(0, 0) not in rows and rows[key(0, 1)] is None and rows[key(0, 2)] == key(0, 1)


def test_a_failed_row_and_a_rejected_row_are_taken_down_too(tmp_path):
    cfg = make_run(str(tmp_path / "run"))
    run_forget(cfg, {"urls": _list(tmp_path, "u.txt", [url(2, 7)]), "keys": _list(tmp_path, "k.txt", [key(2, 6)])})
    fs, path = commit.fs_and_path(cfg.path("images"))
    marker = commit.read_marker(fs, path, 2)
    meta = {r["key"]: r for r in pq.read_table(commit.shard_file(path, 2, ".parquet", marker)).to_pylist()}
    assert meta[key(2, 7)]["code"] == meta[key(2, 6)]["code"] == "taken_down"  # retry-failed will not refetch it
    tfs, tpath = commit.fs_and_path(cfg.path("tokens"))
    assert key(2, 6) not in commit.read_marker(tfs, tpath, 2)["rejected_keys"]


def test_a_list_that_matches_nothing_says_so_and_changes_no_shard(tmp_path):
    cfg = make_run(str(tmp_path / "run"))
    before = checksums(cfg.path("images"), cfg.path("tokens"), cfg.path("clip_retrieval"))
    out = run_forget(cfg, {"keys": _list(tmp_path, "k.txt", ["nosuchkey"])})
    assert out["rows_removed"] == 0 and "matched no row" in out["note"]
    assert checksums(cfg.path("images"), cfg.path("tokens"), cfg.path("clip_retrieval")) == before


def test_malformed_lines_are_named_with_line_numbers_and_nothing_changes(tmp_path):
    cfg = make_run(str(tmp_path / "run"))
    before = checksums(cfg.path("images"), cfg.path("tokens"), cfg.path("clip_retrieval"))
    with pytest.raises(InputError, match=r"u\.txt: 2 malformed.*line 2: 'ftp://x/y.png': not an http\(s\) URL; "
                                         r"line 4: 'not a url'"):
        run_forget(cfg, {"urls": _list(tmp_path, "u.txt", [url(0, 1), "ftp://x/y.png", "", "not a url"])})
    with pytest.raises(InputError, match=r"s\.txt: 1 malformed.*line 1: 'abc': not a sha256"):
        run_forget(cfg, {"sha256": _list(tmp_path, "s.txt", ["abc", sha(0, 1)])})
    assert checksums(cfg.path("images"), cfg.path("tokens"), cfg.path("clip_retrieval")) == before
    assert not os.path.exists(cfg.path("takedowns"))


def test_uncommitted_shards_are_refused_until_the_run_is_repaired(tmp_path):
    cfg = make_run(str(tmp_path / "run"), export=False)
    open(os.path.join(cfg.path("images"), "00007.tar"), "wb").write(b"half")
    with pytest.raises(PipelineError, match=r"images: shards 00007 have files but no commit marker"):
        run_forget(cfg, {"keys": _list(tmp_path, "k.txt", [key(0, 1)])})
    assert key(0, 1) in token_keys(cfg)


def test_a_forget_while_a_download_holds_the_run_refuses_and_the_reverse(tmp_path):
    cfg = make_run(str(tmp_path / "run"), export=False)
    before = checksums(cfg.path("images"), cfg.path("tokens"))
    with Lease(cfg.path("images"), "download"):
        with pytest.raises(PipelineError, match=r"being written by download run"):
            run_forget(cfg, {"keys": _list(tmp_path, "k.txt", [key(0, 1)])})
    assert checksums(cfg.path("images"), cfg.path("tokens")) == before
    with Lease(cfg.path("tokens"), "forget"):  # what a running forget holds
        with pytest.raises(PipelineError, match=r"being written by forget run.*refusing to start a second tokenize"):
            Lease(cfg.path("tokens"), "tokenize").acquire()


def test_a_second_takedown_rewrites_the_next_generation(tmp_path):
    cfg = make_run(str(tmp_path / "run"))
    run_forget(cfg, {"keys": _list(tmp_path, "a.txt", [key(1, 3)])})
    out = run_forget(cfg, {"keys": _list(tmp_path, "b.txt", [key(1, 4)])})
    assert out["takedown"] == "00001"
    fs, path = commit.fs_and_path(cfg.path("tokens"))
    assert commit.read_marker(fs, path, 1)["generation"] == 2 and sorted(
        n for n in os.listdir(path) if n.startswith("00001")) == ["00001.done.json", "00001.g2.parquet"]
    assert {key(1, 3), key(1, 4)}.isdisjoint(token_keys(cfg) | export_keys(cfg) | set(side_rows(cfg)))


def test_parquet_image_shards_lose_the_image_bytes_and_keep_the_key(tmp_path):
    cfg = make_run(str(tmp_path / "run"), image_format="parquet", export=False, dedup=False)
    out = run_forget(cfg, {"sha256": _list(tmp_path, "s.txt", [sha(0, 2)])})
    assert out["rewritten"]["images"] == [0] and key(0, 2) not in image_keys(cfg)[0] and len(image_keys(cfg)[0]) == 6
    fs, path = commit.fs_and_path(cfg.path("images"))
    marker = commit.read_marker(fs, path, 0)
    assert sorted(marker["files"]) == ["00000.g1.parquet", "00000.g1_stats.json"]
    row = next(r for r in pq.read_table(commit.shard_file(path, 0, ".parquet", marker)).to_pylist()
               if r["key"] == key(0, 2))
    assert row["png"] is None and row["code"] == "taken_down" and row["url"] is None
