"""What an offline W&B run recorded, read from its ``run-<id>.wandb`` file (wandb 0.31 has no Python reader of its
own): for the tests of ``logging.wandb``."""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from typing import Any


def records(run_dir: str, timeout: float = 30.0) -> list[Any]:
    """The run's protobuf records: a ``:W&B`` header (7 bytes), then LevelDB-log chunks (crc32c, length, type: 1
    whole, 2/3/4 first/middle/last) in 32 KiB blocks. W&B's writer can still be flushing the file when the run's
    ``finish`` has returned, so a file that ends inside a chunk or a record is read again until it is whole."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            data = f.read()
        got = _parse(data)
        if got is not None or time.monotonic() > deadline:
            assert got is not None, f"{path} ({len(data)} bytes) still ends inside a record after {timeout}s"
            return got
        time.sleep(0.2)


def _parse(data: bytes) -> list[Any] | None:
    """The records of a whole file; None when it ends inside a chunk or a record (still being written)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            return None
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(buf)
            except DecodeError:
                return None
            out.append(record)
            buf = b""
    return None if buf else out


def history(recs: list[Any]) -> dict[int, dict[str, Any]]:
    """Step → everything logged at it (an image's fields as ``<tag>/<field>``)."""
    out: dict[int, dict[str, Any]] = {}
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            out.setdefault(r.history.step.num, {}).update(items)
    return out


def summary(recs: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            out.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return out
