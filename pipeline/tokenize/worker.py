"""Where tokenize's work happens on a cluster: decode tasks stream an image shard's rows, in batches, straight to an
encoder actor, and that actor, which is also the shard's writer, encodes them and commits the token shard itself
(Parquet, then marker, under the run's lease). The driver plans shards and collects each shard's marker: encoded
rows never pass through it.

Pure stage logic over numpy batches; ``pipeline.runtime.ray_seam.shard_workers`` is the wiring.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.forget.request import Selectors
from pipeline.storage.lease import LeaseToken
from pipeline.tokenize.encode import Encoder, EncoderSpec, decode_shard
from pipeline.tokenize.writer import ShardAssembler


def column_batches(rows: list[dict[str, Any]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Decoded rows → column batches of at most ``size`` rows (images stacked (N, S, S, 3))."""
    for start in range(0, len(rows), size):
        part = rows[start:start + size]
        batch = {k: np.asarray([r[k] for r in part]) for k in part[0] if k != "image"}
        batch["image"] = np.stack([r["image"] for r in part])
        yield batch


class DecodeShard:
    """The decode step of one run: an image shard → its decoded rows in batches (a CPU task, streamed)."""

    def __init__(self, images: str, size: int, files: dict[int, dict[str, Any]], batch_size: int,
                 refuse: Selectors | None = None):
        self.images, self.size, self.files, self.batch_size = images, size, files, batch_size
        self.refuse = refuse  # the run's takedowns: a row they name is rejected, never encoded

    def __call__(self, item: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        sid = int(item["shard_id"])
        extras = list(item.get("extra_columns") or {})
        rows = decode_shard(self.images, sid, self.size, int(item["expected"]), self.files[sid], extras)
        if self.refuse:
            for r in rows:
                if not r["reject"] and self.refuse.matches(r["key"], r["url"] or None, r["sha256"] or None):
                    r["reject"] = "taken_down: named by a takedown of this run"
        yield from column_batches(rows, self.batch_size)


class ShardTokenizer:
    """An encoder that writes what it encodes: one image shard's decoded batches in, its committed token shard out.

    A shard is committed whole or not at all (its marker last), so an actor lost mid-shard leaves nothing, and the
    shard is handed to another actor from the start; a row delivered twice (a re-executed decode task) counts once.
    """

    def __init__(self, spec: EncoderSpec, tokens: str, metadata: dict[str, Any], lease: LeaseToken,
                 threads: int = 0, gpus: float = 0.0, require_gpu: bool = False):
        self.encoder = Encoder(spec, threads, gpus, require_gpu)
        self.tokens, self.metadata, self.lease = tokens, metadata, lease

    def process(self, item: dict[str, Any], batches: Iterator[dict[str, np.ndarray]]) -> dict[str, Any]:
        sid, expected = int(item["shard_id"]), int(item["expected"])
        t0 = time.time()
        assembler = ShardAssembler(self.tokens, self.metadata, {sid: expected}, before_commit=self.lease.check,
                                   extra_columns={sid: item.get("extra_columns") or {}})
        for batch in batches:
            assembler.add(self.encoder(batch))
        if assembler.failed:
            return {"shard_id": sid, "failed": assembler.failed, "rows_in": expected}
        missing = assembler.missing()
        if missing:
            raise DataError(f"token shard {sid:05d}: {missing[sid]} of {expected} rows never arrived from its decode")
        return {"shard_id": sid, "written": assembler.written, "rows_in": expected,
                "encode_s": round(time.time() - t0, 3)}
