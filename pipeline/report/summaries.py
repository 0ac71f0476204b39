"""What each command printed, kept in the run's storage (``<run_dir>/_summaries/<command>.json``): the report of a
run whose stages ran as separate Ray jobs on nodes that share nothing reads them from there."""

from __future__ import annotations

import json
from typing import Any

from pipeline.storage.commit import fs_and_path
from pipeline.storage.urls import join, write_json

SUMMARIES = "_summaries"


def record_summary(run_dir: str, command: str, summary: dict[str, Any]) -> None:
    write_json(join(run_dir, SUMMARIES, f"{command}.json"), summary)


def read_summaries(cfg: Any) -> dict[str, dict[str, Any]]:
    fs, folder = fs_and_path(join(cfg.run_dir, SUMMARIES))
    fs.invalidate_cache()
    found = sorted(fs.glob(f"{folder}/*.json")) if fs.exists(folder) else []
    return {p.rsplit("/", 1)[-1].removesuffix(".json"): json.loads(fs.cat_file(p)) for p in found}
