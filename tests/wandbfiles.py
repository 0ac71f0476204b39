"""What an offline W&B run recorded, read from its ``run-<id>.wandb`` file (wandb 0.31 has no Python reader of its
own): for the tests of ``logging.wandb``."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any


def records(run_dir: str) -> list[Any]:
    """The run's protobuf records: a ``:W&B`` header (7 bytes), then LevelDB-log chunks (crc32c, length, type: 1
    whole, 2/3/4 first/middle/last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


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
