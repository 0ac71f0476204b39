"""Image shards and token shards made for each other, as download and tokenize leave them, with keys to spare on
either side: the decoder's join must count those and never pair a row with another row's image."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demo import synth
from pipeline.storage import commit
from pipeline.tokenize import writer as tokenize

EMBED, TEXT_VOCAB = 16, 60
META = {"grid": 2, "embed_dim": EMBED, "dvae": {"vocab_size": 8}, "clip": {"model": "test"},
        "tokenizer": {"vocab_size": TEXT_VOCAB}, "preprocess": {}, "schema_version": "1"}


def embedding(s: synth.Sample) -> np.ndarray:
    """A stand-in CLIP image embedding that names colour and position (what the decoder must draw)."""
    e = np.zeros(EMBED, np.float32)
    e[list(synth.COLOURS).index(s.colour)] = 1.0
    e[8 + synth.POSITIONS.index(s.position)] = 1.0
    e[12 + list(synth.BACKGROUNDS).index(s.background)] = 0.5
    return e


def _commit_tar(folder: Path, sid: int, items: list[tuple[str, synth.Sample]], size: int) -> None:
    buf, status = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, s in items:
            for ext, data in (("json", json.dumps({"key": key}).encode()), ("png", synth.render_png(s, size)),
                              ("txt", s.caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            status.append({"key": key, "status": "success"})
    (folder / f"{sid:05d}.tar").write_bytes(buf.getvalue())
    pq.write_table(pa.Table.from_pylist(status), folder / f"{sid:05d}.parquet")
    fs, out = commit.fs_and_path(str(folder))
    files = {n: {"bytes": (folder / n).stat().st_size, "sha256": commit.sha256_file(fs, str(folder / n))}
             for n in (f"{sid:05d}.tar", f"{sid:05d}.parquet")}
    commit.write_marker(fs, out, sid, {"shard_id": sid, "count": len(items), "successes": len(items),
                                       "files": files})


def write_joined(root: Path, shards: int = 2, rows: int = 24, size: int = 16, no_image: tuple[str, ...] = (),
                 no_tokens: tuple[str, ...] = (), image_emb: bool = True) -> dict[str, synth.Sample]:
    """``root/images`` and ``root/tokens``, shard N made from shard N; keys in ``no_image`` get a token row but no
    image, keys in ``no_tokens`` an image but no token row. Returns key → sample."""
    samples, _ = synth.make_samples(shards * rows, 0.1, seed=0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    by_key = {}
    for sid in range(shards):
        items = [(f"{sid:05d}{i:04d}", samples[sid * rows + i]) for i in range(rows)]
        by_key.update(items)
        _commit_tar(root / "images", sid, [(k, s) for k, s in items if k not in no_image], size)
        rows_tok = [(k, s) for k, s in items if k not in no_tokens]
        n = len(rows_tok)
        emb = np.stack([embedding(s) for _, s in rows_tok])
        cols = {"key": [k for k, _ in rows_tok], "url": [""] * n, "caption": [s.caption for _, s in rows_tok],
                "sha256": [""] * n, "width": [size] * n, "height": [size] * n,
                "text_tokens": [[1 + list(synth.COLOURS).index(s.colour), 20 + synth.POSITIONS.index(s.position)]
                                for _, s in rows_tok],
                "image_tokens": np.zeros((n, 4), np.int64), "clip_text_emb": emb, "clip_image_emb": emb,
                "clip_similarity": np.zeros(n, np.float32)}
        tokenize.write_token_shard(str(root / "tokens"), sid, cols, META)
        if not image_emb:  # the writer always writes it: drop it from the file, as an older tokenize left it
            _drop_column(root / "tokens", sid, "clip_image_emb")
    return by_key


def _drop_column(folder: Path, sid: int, column: str) -> None:
    """Rewrite a committed token shard without ``column`` (an older tokenize), keeping its marker consistent."""
    path = folder / f"{sid:05d}.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop([column]), path)
    fs, out = commit.fs_and_path(str(folder))
    marker = commit.read_marker(fs, out, sid) or {}
    marker = {k: v for k, v in marker.items() if k not in ("bytes", "footer_sha256", "sha256", "files")}
    commit.write_marker(fs, out, sid, marker)
