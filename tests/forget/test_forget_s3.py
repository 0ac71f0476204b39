"""forget on an object store (moto's S3 server on loopback): the generation switch and its tidying, the record
and the lease work through s3:// as on local disk."""

from __future__ import annotations

import pytest
from takedown_run import key, make_run
from test_forget import export_keys, image_keys, side_rows, token_keys

from pipeline.forget.run import run_forget
from pipeline.storage import commit

pytestmark = pytest.mark.slow


def test_forget_on_s3(tmp_path, s3):
    cfg = make_run("s3://laion/takedown-run", shards=2)
    (tmp_path / "k.txt").write_text(f"{key(1, 2)}\n")
    out = run_forget(cfg, {"keys": str(tmp_path / "k.txt")})
    assert out["rows_removed"] == 1 and out["record"] == "s3://laion/takedown-run/takedowns/00000.json"
    assert key(1, 2) not in token_keys(cfg) | export_keys_s3(cfg) | set(side_rows(cfg))
    assert image_keys(cfg)[0] == {key(0, i) for i in range(7)} and len(image_keys(cfg)[1]) == 6
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls("laion/takedown-run/tokens") if "00001" in p)
    assert names == ["00001.done.json", "00001.g1.parquet"]
    fs, path = commit.fs_and_path(cfg.path("images"))
    assert not [p for p in fs.ls(path) if p.endswith(("00001.tar", "00001.parquet"))]  # the old generation gone
    assert s3.exists("laion/takedown-run/takedowns/00000.request.json")


def export_keys_s3(cfg) -> set[str]:
    import io

    import pyarrow.parquet as pq

    fs, path = commit.fs_and_path(cfg.path("clip_retrieval"))
    return {k for p in fs.glob(f"{path}/metadata/*.parquet")
            for k in pq.read_table(io.BytesIO(fs.cat_file(p))).column("key").to_pylist()}


_ = export_keys  # the local reader of the same folders (tests/forget/test_forget.py)
