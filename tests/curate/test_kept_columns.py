"""download.save_additional_columns kept end to end: URL list → image shards' json/Parquet → token shards (typed,
nullable, named in the shard's provenance) → clip-retrieval's metadata; bad options are refused by name."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_tiny_models

from pipeline.config import load_config
from pipeline.download.run import run_download
from pipeline.errors import ConfigError, InputError
from pipeline.storage import schema
from pipeline.tokenize.encode import encoder_spec
from pipeline.tokenize.export import export_clip_retrieval
from pipeline.tokenize.run import run_tokenize

N = 24


def _url_list(path, server, samples) -> dict[str, list]:
    """A LAION-like list: similarity (float), punsafe (float with nulls), LICENSE (string with nulls), NSFW_n (int)."""
    cols = {"url": [server.url(s.index) for s in samples], "caption": [s.caption for s in samples],
            "similarity": [0.2 + 0.01 * i for i in range(N)],
            "punsafe": [None if i % 5 == 0 else i / 100 for i in range(N)],
            "LICENSE": [None if i % 3 == 0 else f"cc-by-{i}" for i in range(N)],
            "NSFW_n": list(range(N))}
    pq.write_table(pa.table(cols), path)
    return cols


@pytest.mark.slow
def test_columns_travel_download_tokenize_export(tmp_path, ray_cluster, image_server, tiny_samples):
    samples = tiny_samples[0][:N]
    cols = _url_list(tmp_path / "urls.parquet", image_server, samples)
    extras = ["similarity", "punsafe", "LICENSE", "NSFW_n"]
    urls = tmp_path / "urls.parquet"
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", f"download.input={urls}",
                                            "download.allow_private_addresses=true", "download.shard_size=8",
                                            f"download.save_additional_columns={json.dumps(extras)}",
                                            "clip.steps=1", "tokenize.batch_size=8"])
    run_download(cfg)
    by_url = {u: i for i, u in enumerate(cols["url"])}
    images = cfg.path("images")
    marker = json.load(open(f"{images}/00001.done.json"))
    assert marker["extra_columns"] == {"similarity": "double", "punsafe": "double", "LICENSE": "string",
                                       "NSFW_n": "int64"}
    # image shards: img2dataset's json and metadata Parquet carry the values
    meta_pq = pq.read_table(f"{images}/00001.parquet")
    assert meta_pq.schema.field("punsafe").type == pa.float64() and meta_pq.schema.field("NSFW_n").type == pa.int64()
    with tarfile.open(f"{images}/00001.tar") as tar:
        js = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert js and all(j["LICENSE"] == cols["LICENSE"][by_url[j["url"]]] for j in js)

    make_tiny_models(cfg)
    run_tokenize(cfg, encoder_spec(cfg))
    table, _ = schema.read_token_shards(cfg.path("tokens"))
    assert table.num_rows == N
    for name, typ in (("similarity", pa.float64()), ("punsafe", pa.float64()), ("LICENSE", pa.string()),
                      ("NSFW_n", pa.int64())):
        assert table.schema.field(name).type == typ and table.schema.field(name).nullable
    for row in table.select(["url", *extras]).to_pylist():
        i = by_url[row["url"]]
        assert row["NSFW_n"] == i and row["LICENSE"] == cols["LICENSE"][i] and row["punsafe"] == cols["punsafe"][i]
        assert row["similarity"] == pytest.approx(cols["similarity"][i])
    assert table.column("punsafe").null_count == sum(v is None for v in cols["punsafe"])
    meta = schema.read_metadata(*_fs(cfg.path("tokens") + "/00000.parquet"))
    assert meta["extra_columns"] == marker["extra_columns"] and meta["schema_version"] == schema.SCHEMA_VERSION
    # v1 columns first, in order, then the extras
    assert table.schema.names[:11] == schema.token_schema(2, 4).names

    out = tmp_path / "export"
    export_clip_retrieval(cfg.path("tokens"), str(out))
    md = pa.concat_tables([pq.read_table(p) for p in sorted((out / "metadata").glob("*.parquet"))])
    assert md.schema.field("punsafe").type == pa.float64()
    for row in md.to_pylist():
        i = by_url[row["url"]]
        assert (row["LICENSE"], row["punsafe"], row["NSFW_n"]) == (cols["LICENSE"][i], cols["punsafe"][i], i)
    emb = np.load(sorted((out / "img_emb").glob("*.npy"))[0])
    assert emb.shape[0] == pq.read_table(sorted((out / "metadata").glob("*.parquet"))[0]).num_rows


def _fs(path):
    from pipeline.storage import commit

    return commit.fs_and_path(path)


def test_a_missing_or_reserved_additional_column_is_refused(tmp_path, image_server, tiny_samples):
    _url_list(tmp_path / "urls.parquet", image_server, tiny_samples[0][:N])
    base = [f"run_dir={tmp_path / 'run'}", f"download.input={tmp_path / 'urls.parquet'}",
            "download.allow_private_addresses=true"]
    with pytest.raises(ConfigError, match="'WIDTH' is already a column"):
        load_config("configs/tiny.yaml", base + ['download.save_additional_columns=["WIDTH"]'])
    with pytest.raises(ConfigError, match="twice"):
        load_config("configs/tiny.yaml", base + ['download.save_additional_columns=["a", "A"]'])
    cfg = load_config("configs/tiny.yaml", base + ['download.save_additional_columns=["pwatermark"]'])
    with pytest.raises(InputError, match=r"urls.parquet: column 'pwatermark' of download.save_additional_columns "
                                         r"not found \(columns: url, caption, similarity"):
        run_download(cfg)


def test_an_additional_column_of_a_nested_type_is_refused(tmp_path, image_server, tiny_samples):
    samples = tiny_samples[0][:4]
    pq.write_table(pa.table({"url": [image_server.url(s.index) for s in samples], "caption": ["a"] * 4,
                             "tags": [["x"], [], ["y", "z"], None]}), tmp_path / "urls.parquet")
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", f"download.input={tmp_path}/urls.parquet",
                                            "download.allow_private_addresses=true",
                                            'download.save_additional_columns=["tags"]'])
    with pytest.raises(InputError, match=r"column 'tags' .* has type list<element: string>; only bool, integer"):
        run_download(cfg)


def test_token_table_types_extra_columns_from_the_metadata():
    rows = {"key": ["b", "a"], "url": ["u", "v"], "caption": ["c", "d"], "sha256": ["", ""], "width": [1, 2],
            "height": [1, 2], "text_tokens": [[1], [2]], "image_tokens": np.zeros((2, 4), np.uint16),
            "clip_image_emb": np.ones((2, 3)), "clip_text_emb": np.ones((2, 3)),
            "clip_similarity": np.ones(2), "punsafe": np.asarray([None, 0.5], dtype=object),
            "flag": np.asarray([True, None], dtype=object)}
    meta = {"grid": 2, "embed_dim": 3, "extra_columns": {"punsafe": "double", "flag": "bool"}}
    t = schema.build_table(rows, 2, 3, meta)
    assert t.schema.field("punsafe").type == pa.float64() and t.column("punsafe").to_pylist() == [None, 0.5]
    assert t.column("flag").to_pylist() == [True, None]
    buf = io.BytesIO(schema.table_bytes(t))
    assert pq.read_table(buf).schema.names[-2:] == ["punsafe", "flag"]
