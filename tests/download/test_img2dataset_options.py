"""img2dataset's options as a user of it writes them, against the fault-injecting server on loopback (no Ray): txt
URL lists, resize_mode keep_ratio_largest, verify_hash ([column, algorithm] → hash_mismatch rows) and
disallowed_header_directives (img2dataset's default list, settable)."""

from __future__ import annotations

import gzip
import hashlib
import os

import pandas as pd
import pytest
from faultserver import FaultServer, _encode, _picture

from pipeline.config import load_config
from pipeline.download import runs
from pipeline.download.fetch import AddressPolicy, close_idle, fetch
from pipeline.download.planner import expand_input, plan_shards
from pipeline.download.run import run_download
from pipeline.download.shard import _fetch_one, download_shard, fetch_limits, image_processor
from pipeline.errors import ConfigError, InputError
from pipeline.storage import commit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        s.blobs["/tall.png"] = (_encode(_picture(0, (60, 300)), "PNG"), "image/png", {})
        s.blobs["/noindex.jpg"] = (s.blobs["/ok.jpg"][0], "image/jpeg", {"X-Robots-Tag": "noindex"})
        yield s


@pytest.fixture(autouse=True)
def no_pooled_connections():
    close_idle()
    yield
    close_idle()


def cfg_for(tmp_path, server, inp, *extra):
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
        f"run_dir={tmp_path / 'run'}", f"download.input={inp}", "download.retries=0", "download.deadline=3",
        f"download.allowed_addresses=['127.0.0.1:{server.port}']", "download.dedup_images=false", *extra])


def download_all(cfg):
    """Plan and download every shard in this process (what the stage's Ray tasks do), then the rows' metadata."""
    dcfg, images = cfg.download, cfg.path("images")
    plans, _ = plan_shards(dcfg, expand_input(dcfg.input, dcfg.input_format), set(), f"{images}/_plan/t")
    manifests = [download_shard(dcfg, images, plan, 0) for plan in plans]
    rows = []
    for sid in commit.committed_shards(*commit.fs_and_path(images)):
        rows += runs.shard_meta(images, sid, ["key", "url", "caption", "code", "error_message", "width",
                                              "height"]).to_pylist()
    return manifests, sorted(rows, key=lambda r: r["key"])


@pytest.mark.parametrize("name,fmt", [("urls.txt", ""), ("urls.txt.gz", ""), ("urls.list", "txt")])
def test_txt_url_list_is_one_url_a_line_without_captions(tmp_path, server, name, fmt):
    paths = ["/ok.jpg", "/ok.png", "/status/404"]
    text = "".join(server.url(p) + "\n" for p in paths).encode()
    (tmp_path / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    cfg = cfg_for(tmp_path, server, tmp_path / name, *([f"download.input_format={fmt}"] if fmt else []))
    assert cfg.download.drop_empty_captions  # a list with no captions at all is not a list of empty captions
    manifests, rows = download_all(cfg)
    assert [r["url"] for r in rows] == [server.url(p) for p in paths]
    assert [r["code"] for r in rows] == ["ok", "ok", "http_4xx"] and {r["caption"] for r in rows} == {None}
    assert manifests[0]["codes"] == {"ok": 2, "http_4xx": 1}


def test_input_format_picks_a_folders_files_by_extension(tmp_path, server):
    (tmp_path / "in").mkdir()
    for n in ("a.txt", "b.txt", "c.csv"):
        (tmp_path / "in" / n).write_text(server.url("/ok.jpg") + "\n")
    assert [os.path.basename(f) for f in expand_input(str(tmp_path / "in"), "txt")] == ["a.txt", "b.txt"]
    assert len(expand_input(str(tmp_path / "in"))) == 3  # without it: every supported extension, txt included
    with pytest.raises(ConfigError, match="download.input_format"):
        cfg_for(tmp_path, server, tmp_path / "in", "download.input_format=xlsx")
    with pytest.raises(InputError, match=r"a.txt: download.verify_hash names a column, but a txt URL list"):
        download_all(cfg_for(tmp_path, server, tmp_path / "in" / "a.txt", "download.verify_hash=[h, md5]"))


def test_keep_ratio_largest_fits_the_longest_side_without_padding(server):
    cfg = load_config(None, ["download.image_size=32", "download.resize_mode=keep_ratio_largest"]).download
    proc, limits = image_processor(cfg), fetch_limits(cfg)
    policy = AddressPolicy(True)
    sizes = {}
    for path in ("/wide.png", "/tall.png", "/ok.jpg"):  # 1000x50, 60x300, 320x240
        out = _fetch_one(server.url(path), limits, policy, proc)
        assert out.code == "ok", out.message
        sizes[path] = (out.meta["width"], out.meta["height"])
    assert sizes == {"/wide.png": (32, 2), "/tall.png": (6, 32), "/ok.jpg": (32, 24)}
    border = image_processor(load_config(None, ["download.image_size=32", "download.resize_mode=border"]).download)
    assert _fetch_one(server.url("/tall.png"), limits, policy, border).meta["width"] == 32  # border pads, this not


@pytest.mark.parametrize("column,algorithm", [("sha256", "sha256"), ("expected_md5", "md5")])
def test_verify_hash_rows_whose_bytes_differ_end_hash_mismatch(tmp_path, server, column, algorithm):
    def digest(path):
        return hashlib.new(algorithm, server.blobs[path][0]).hexdigest()

    rows = [(server.url("/ok.jpg"), "right", digest("/ok.jpg")),
            (server.url("/ok.png"), "other image's digest", digest("/ok.jpg")),
            (server.url("/gray.jpg"), "upper case hex", digest("/gray.jpg").upper()),
            (server.url("/rgba.png"), "no digest", None),
            (server.url("/status/404"), "never fetched", digest("/ok.jpg"))]
    lst = tmp_path / "urls.parquet"
    pd.DataFrame(rows, columns=["url", "caption", column]).to_parquet(lst)
    cfg = cfg_for(tmp_path, server, lst, f"download.verify_hash=[{column}, {algorithm}]")
    manifests, got = download_all(cfg)
    assert [r["code"] for r in got] == ["ok", "hash_mismatch", "ok", "hash_mismatch", "http_4xx"]
    assert f"{algorithm} of the downloaded bytes is {digest('/ok.png')}" in got[1]["error_message"]
    assert manifests[0]["codes"] == {"ok": 2, "hash_mismatch": 2, "http_4xx": 1}
    assert manifests[0]["failed_to_download"] == 3  # as img2dataset counts a mismatch
    summary = runs.summarize(cfg.path("images"), {}, {})
    assert summary["codes"]["hash_mismatch"] == 2 and summary["successes"] == 2


@pytest.mark.parametrize("name", ["urls.parquet", "urls.csv", "urls.jsonl"])
def test_verify_hash_naming_a_missing_column_fails_before_any_download(tmp_path, server, name):
    df = pd.DataFrame({"url": [server.url("/ok.jpg")], "caption": ["x"], "md5": ["0" * 32]})
    path = tmp_path / name
    {"urls.parquet": lambda: df.to_parquet(path), "urls.csv": lambda: df.to_csv(path, index=False),
     "urls.jsonl": lambda: df.to_json(path, orient="records", lines=True)}[name]()
    server.reset_counts()
    cfg = cfg_for(tmp_path, server, path, "download.verify_hash=[sha256, sha256]")
    with pytest.raises(InputError, match=rf"{name}: column 'sha256' of download.verify_hash not found "
                                         r"\(columns: url, caption, md5\)"):
        run_download(cfg)
    assert server.connections == 0 and not server.hits, "a download started before the list was checked"
    assert not commit.committed_shards(*commit.fs_and_path(cfg.path("images")))
    with pytest.raises(ConfigError, match="download.verify_hash"):
        cfg_for(tmp_path, server, path, "download.verify_hash=[md5, crc32]")


def test_disallowed_header_directives_default_to_img2datasets_list_and_can_be_set(server):
    policy = AddressPolicy(True)

    def code(path, *overrides):
        return fetch(server.url(path), fetch_limits(load_config(None, list(overrides)).download), policy).code

    assert load_config(None, []).download.disallowed_header_directives == ["noai", "noimageai", "noindex",
                                                                          "noimageindex"]
    assert code("/noindex.jpg") == "opted_out" and code("/noai.jpg") == "opted_out"
    assert code("/noindex.jpg", "download.disallowed_header_directives=[noai]") == "ok"
    assert code("/noai.jpg", "download.disallowed_header_directives=[NoAI]") == "opted_out"  # case-insensitive
    assert code("/noai.jpg", "download.disallowed_header_directives=[]") == "ok"
    assert code("/noindex.jpg", "download.honor_opt_out=false") == "ok"
    assert code("/robots-other.jpg") == "ok"  # a directive for another user agent only
