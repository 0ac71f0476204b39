"""URL list → resized image shards, one shard at a time, with img2dataset's own reader/resizer/downloader/writer.

This module is the per-shard logic; ``pipeline.ray_seam`` schedules it as Ray tasks. What it adds around
img2dataset: a shard is committed only after its files are written (marker last, see ``pipeline.commit``), a rerun
skips committed shards, and changed settings are refused before any write.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home

from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.reader import Reader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from img2dataset.writer import WebDatasetSampleWriter  # noqa: E402

from pipeline import commit  # noqa: E402
from pipeline.config import DownloadConfig  # noqa: E402

FORMATS = ("parquet", "csv", "tsv", "jsonl", "json")
OOM_SHARD_COUNT = 5  # shard names are {shard:05d}, the same in images/ and tokens/


class InputError(ValueError):
    """The URL list cannot be read; the message names the file and the reason."""


def input_format(path: str) -> str:
    """img2dataset's input_format for a file name: parquet, csv, tsv, jsonl, json, optionally with .gz."""
    name = path.lower()
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    for fmt in FORMATS:
        if base.endswith("." + fmt):
            if fmt == "parquet" and gz:
                break
            return fmt + (".gz" if gz else "")
    raise InputError(f"{path}: unsupported URL list format (expected one of {', '.join(FORMATS)}, optionally .gz)")


def expand_input(spec: str) -> list[str]:
    """A file, a folder (every supported file in it) or a glob → sorted list of files, local or remote."""
    if not spec:
        raise InputError("download.input is empty: give a URL list file, folder or glob")
    fs, path = commit.fs_and_path(spec)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if globlib.has_magic(path):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if _supported(p))
    elif fs.exists(path):
        files = [path]
    else:
        raise InputError(f"{spec}: no such file or folder")
    files = [prefix + p for p in files if fs.isfile(p)]
    if not files:
        raise InputError(f"{spec}: no URL list files found")
    for f in files:
        input_format(f)
    return files


def _supported(path: str) -> bool:
    try:
        input_format(path)
        return True
    except InputError:
        return False


def shard_settings(cfg: DownloadConfig, files: list[str]) -> dict[str, Any]:
    """What shapes the shards' content; a rerun with different values is refused."""
    sizes = {}
    for f in files:
        fs, p = commit.fs_and_path(f)
        sizes[f] = fs.size(p)
    return {
        "input_files": sizes, "url_col": cfg.url_col, "caption_col": cfg.caption_col,
        "shard_size": cfg.shard_size, "image_size": cfg.image_size, "resize_mode": cfg.resize_mode,
        "output_format": cfg.output_format, "encode_format": cfg.encode_format, "encode_quality": cfg.encode_quality,
    }


@dataclass
class ShardPlan:
    shard_id: int
    arrow_path: str


def plan_shards(cfg: DownloadConfig, files: list[str], done: set[int], tmp_dir: str) -> list[ShardPlan]:
    """Split the URL list into shards with img2dataset's Reader, skipping ``done`` shard ids."""
    os.makedirs(tmp_dir, exist_ok=True)
    plans: list[ShardPlan] = []
    next_id = 0
    for f in files:
        _check_columns(f, cfg)
        try:
            reader = Reader(f, input_format(f), cfg.url_col, cfg.caption_col or None, None, None, None,
                            cfg.shard_size, done, tmp_dir, next_id)
            shards, count = reader._save_to_arrow(f, next_id)  # one file at a time keeps ids contiguous
        except KeyError as exc:
            raise InputError(f"{f}: column {exc} not found (set download.url_col / download.caption_col)") from exc
        except Exception as exc:  # noqa: BLE001 — surface pandas/pyarrow parse errors with the file name
            raise InputError(f"{f}: cannot read URL list ({type(exc).__name__}: {exc})") from exc
        plans += [ShardPlan(sid, path) for sid, path in shards]
        next_id += count
    return sorted(plans, key=lambda p: p.shard_id)


def _check_columns(path: str, cfg: DownloadConfig) -> None:
    """Name a missing url/caption column before img2dataset's reader fails on it less clearly."""
    if input_format(path) != "parquet":
        return  # text formats: img2dataset raises KeyError, turned into the same message by plan_shards
    import pyarrow.parquet as pq

    fs, p = commit.fs_and_path(path)
    try:
        with fs.open(p, "rb") as f:
            names = pq.read_schema(f).names
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
    for key, col in (("url_col", cfg.url_col), ("caption_col", cfg.caption_col)):
        if col and col not in names:
            raise InputError(f"{path}: column '{col}' not found (set download.{key}; columns: {', '.join(names)})")


def make_downloader(cfg: DownloadConfig, output: str, caption: bool = True) -> Downloader:
    resizer = Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=False,
                      encode_quality=cfg.encode_quality, encode_format=cfg.encode_format)
    columns = (["caption"] if caption else []) + ["url"]
    return Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=cfg.thread_count,
        save_caption=caption, extract_exif=False, output_folder=output, column_list=columns, timeout=cfg.timeout,
        number_sample_per_shard=cfg.shard_size, oom_shard_count=OOM_SHARD_COUNT, compute_hash="sha256",
        verify_hash_type=None, encode_format=cfg.encode_format, retries=cfg.retries, user_agent_token=None,
        disallowed_header_directives=None,
    )


def download_shard(cfg: DownloadConfig, output: str, plan: ShardPlan, attempt: int) -> dict[str, Any]:
    """Download, resize and write one shard, then commit it. Raises on failure (the caller retries)."""
    fs, out = commit.fs_and_path(output)
    # img2dataset deletes its input arrow file when done; work on a copy so a retry still has the original.
    work_copy = f"{plan.arrow_path}.attempt{attempt}"
    with open(plan.arrow_path, "rb") as src, open(work_copy, "wb") as dst:
        dst.write(src.read())
    downloader = make_downloader(cfg, output)
    downloader.download_shard((plan.shard_id, work_copy))
    name = f"{plan.shard_id:05d}"
    with fs.open(f"{out}/{name}_stats.json", "rb") as f:
        stats = json.loads(f.read())
    files = {}
    for suffix in (".tar", ".parquet", "_stats.json"):
        path = f"{out}/{name}{suffix}"
        files[name + suffix] = {"bytes": fs.size(path), "sha256": commit.sha256_file(fs, path)}
    manifest = {
        "shard_id": plan.shard_id, "count": stats["count"], "successes": stats["successes"],
        "failed_to_download": stats["failed_to_download"], "failed_to_resize": stats["failed_to_resize"],
        "errors": stats["status_dict"], "files": files, "attempt": attempt,
    }
    commit.write_marker(fs, out, plan.shard_id, manifest)
    os.remove(plan.arrow_path)
    return manifest
