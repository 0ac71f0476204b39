"""URL list → shard plans: input files found and checked, split by img2dataset's Reader, duplicate URLs found.

``pipeline.download.shard`` turns one plan into one committed shard; ``pipeline.runtime.ray_seam`` schedules the plans
as Ray tasks. What this adds around img2dataset's Reader: errors that name the file (and row, for non-UTF-8 text),
settings fingerprinted by content so a changed list is refused before any write, and run-wide URL de-duplication
decided here, once, in input order, so every rerun makes the same decision.
"""

from __future__ import annotations

import glob as globlib
import importlib.util
import json
import math
import os
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.config import DownloadConfig
from pipeline.config.download import INPUT_FORMATS
from pipeline.download.shard import OOM_SHARD_COUNT, ShardPlan, extra_fields
from pipeline.download.writer import sample_key
from pipeline.errors import InputError
from pipeline.storage import commit

FORMATS = ("parquet", "csv", "tsv", "jsonl", "json", "txt")


def img2dataset_reader() -> type:
    """img2dataset's own ``Reader`` class, from its ``reader.py``. Not ``import img2dataset.reader``: that first runs
    the package's ``__init__``, which imports img2dataset's whole CLI (wandb, albumentations, webdataset and with it
    torch) — seconds on the driver before the first shard can start, for a module that needs pyarrow and pandas."""
    if "img2dataset.reader" in sys.modules:  # already imported the ordinary way in this process
        return sys.modules["img2dataset.reader"].Reader
    name = "pipeline.download._img2dataset_reader"
    if name not in sys.modules:
        package = importlib.util.find_spec("img2dataset")  # a top-level name: found, not imported
        if package is None or not package.submodule_search_locations:
            raise ImportError("img2dataset is not installed")
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(list(package.submodule_search_locations)[0], "reader.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name].Reader


def input_format(path: str, configured: str = "") -> str:
    """img2dataset's input_format for a file: ``configured`` (download.input_format) when set, else from the name:
    parquet, csv, tsv, jsonl, json, txt, optionally with .gz."""
    if configured:
        assert configured.lower() in INPUT_FORMATS, configured  # the config checked it
        return configured.lower()
    name = path.lower()
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    for fmt in FORMATS:
        if base.endswith("." + fmt):
            if fmt == "parquet" and gz:
                break
            return fmt + (".gz" if gz else "")
    raise InputError(f"{path}: unsupported URL list format (expected one of {', '.join(FORMATS)}, optionally .gz)")


def expand_input(spec: str, fmt: str = "") -> list[str]:
    """A file, a folder (every supported file in it; with ``fmt``, every file of that extension) or a glob → sorted
    list of files, local or remote."""
    if not spec:
        raise InputError("download.input is empty: give a URL list file, folder or glob")
    fs, path = commit.fs_and_path(spec)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if globlib.has_magic(path):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if _supported(p, fmt))
    elif fs.exists(path):
        files = [path]
    else:
        raise InputError(f"{spec}: no such file or folder")
    files = [prefix + p for p in files if fs.isfile(p)]
    if not files:
        raise InputError(f"{spec}: no URL list files found")
    for f in files:
        input_format(f, fmt)
    return files


def _supported(path: str, fmt: str = "") -> bool:
    if fmt:
        return path.lower().endswith("." + fmt.lower())
    try:
        input_format(path)
        return True
    except InputError:
        return False


def shard_settings(cfg: DownloadConfig, files: list[str]) -> dict[str, Any]:
    """What shapes the shards' content; a rerun with different values is refused before any write.

    Input files are fingerprinted by content (sha256), so a reordered or edited list is caught, not just a resized one.
    Network knobs (threads, timeouts, retries) are left out: changing them on resume is fine.
    """
    extra: dict[str, Any] = {k: getattr(cfg, k) for k in ("save_additional_columns", "input_format", "verify_hash")
                             if getattr(cfg, k)}
    if cfg.honor_opt_out and sorted(cfg.disallowed_header_directives) != ["noai", "noimageai"]:
        extra["disallowed_header_directives"] = cfg.disallowed_header_directives  # beyond the list it once fixed
    return {
        **extra,  # only when set (or changed): runs recorded before the option existed still match their reruns
        "input_files": {f: _content_hash(f) for f in files}, "url_col": cfg.url_col, "caption_col": cfg.caption_col,
        "shard_size": cfg.shard_size, "image_size": cfg.image_size, "resize_mode": cfg.resize_mode,
        "output_format": cfg.output_format, "encode_format": cfg.encode_format, "encode_quality": cfg.encode_quality,
        "filters": {k: getattr(cfg, k) for k in ("max_pixels", "min_image_size", "max_aspect_ratio",
                                                  "max_caption_bytes", "drop_empty_captions", "honor_opt_out",
                                                  "dedup_urls", "dedup_images")},
    }


def _content_hash(path: str) -> str:
    fs, p = commit.fs_and_path(path)
    try:
        return commit.sha256_file(fs, p)
    except OSError as exc:
        raise InputError(f"{path}: cannot read URL list ({exc})") from exc


def plan_shards(cfg: DownloadConfig, files: list[str], done: set[int],
                plan_dir: str) -> tuple[list[ShardPlan], int]:
    """Split the URL list into shards with img2dataset's Reader (arrow files in ``plan_dir``), skipping ``done``.

    Returns the plans still to run and the number of shards the whole list makes.

    ``plan_dir`` should sit beside the output (local or s3://) so every node of a cluster can read the plans.
    """
    fs, pd_path = commit.fs_and_path(plan_dir)
    fs.makedirs(pd_path, exist_ok=True)
    plans: list[ShardPlan] = []
    next_id = 0
    dups: dict[int, dict[int, str]] = {}
    hashes: list[tuple[int, np.ndarray]] = []
    for f in files:
        _check_columns(f, cfg)
        hash_col, hash_type = cfg.verify_hash or (None, None)
        try:
            reader = img2dataset_reader()(f, input_format(f, cfg.input_format), cfg.url_col, cfg.caption_col or None,
                                          hash_col, hash_type, cfg.save_additional_columns or None, cfg.shard_size,
                                          done, plan_dir, next_id)
            shards, count = reader._save_to_arrow(f, next_id)  # one file at a time keeps ids contiguous
        except KeyError as exc:
            raise InputError(f"{f}: column {exc} not found (set download.url_col / download.caption_col / "
                             "download.save_additional_columns / download.verify_hash)") from exc
        except Exception as exc:  # noqa: BLE001 — surface pandas/pyarrow parse errors with the file name and row
            raise InputError(f"{f}: cannot read URL list ({type(exc).__name__}: {exc})"
                             f"{_bad_utf8_line(f, cfg.input_format)}") from exc
        if shards and cfg.save_additional_columns:
            extra_fields(shards[0][1], cfg.save_additional_columns, f)  # a type no shard can carry: named now
        if cfg.dedup_urls:
            hashes.append((next_id, _url_hashes(f, cfg)))
        plans += [ShardPlan(sid, path) for sid, path in shards]
        next_id += count
    if cfg.dedup_urls:
        dups = duplicate_urls(hashes, cfg.shard_size)
    for plan in plans:
        plan.duplicates = dups.get(plan.shard_id, {})
    return sorted(plans, key=lambda p: p.shard_id), next_id


def _url_hashes(path: str, cfg: DownloadConfig) -> np.ndarray:
    """64-bit hashes of the URL column, in row order (the Reader's order)."""
    import pandas as pd

    fs, p = commit.fs_and_path(path)
    fmt = input_format(path, cfg.input_format)
    with fs.open(p, "rb", compression="gzip" if fmt.endswith(".gz") else None) as f:
        if fmt == "parquet":
            col = pq.read_table(f, columns=[cfg.url_col]).column(0)
        elif fmt.startswith(("csv", "tsv")):
            parse = pa_csv.ParseOptions(delimiter="\t" if fmt.startswith("tsv") else ",")
            col = pa_csv.read_csv(f, parse_options=parse,
                                  convert_options=pa_csv.ConvertOptions(include_columns=[cfg.url_col])).column(0)
        elif fmt.startswith("jsonl"):
            col = pa_json.read_json(f).column(cfg.url_col)
        elif fmt.startswith("txt"):  # one URL per line, no header: as img2dataset's Reader reads it
            col = pa_csv.read_csv(f, read_options=pa_csv.ReadOptions(column_names=["url"])).column(0)
        else:  # json arrays: the Reader itself goes through pandas
            col = pa.array(pd.read_json(f)[cfg.url_col].tolist())
    urls = np.asarray(col.to_pylist(), dtype=object)
    return pd.util.hash_array(urls.astype(str)).astype(np.uint64)


def duplicate_urls(hashes: list[tuple[int, np.ndarray]], shard_size: int) -> dict[int, dict[int, str]]:
    """shard id → {row index: key of the first row with that URL}; first in input order wins (rerun-stable)."""
    if not hashes:
        return {}
    shard_of = np.concatenate([start + np.arange(len(h)) // shard_size for start, h in hashes])
    row_of = np.concatenate([np.arange(len(h)) % shard_size for _, h in hashes])
    _, first, inverse = np.unique(np.concatenate([h for _, h in hashes]), return_index=True, return_inverse=True)
    owner = first[inverse]
    oom = math.ceil(math.log10(shard_size)) if shard_size > 1 else 1
    out: dict[int, dict[int, str]] = {}
    for i in np.nonzero(owner != np.arange(len(owner)))[0]:
        j = owner[i]
        out.setdefault(int(shard_of[i]), {})[int(row_of[i])] = sample_key(int(row_of[j]), int(shard_of[j]), oom,
                                                                           OOM_SHARD_COUNT)
    return out


def _bad_utf8_line(path: str, fmt: str = "") -> str:
    """' (first non-UTF-8 bytes at line N)' when that is why a text list failed to parse, else ''."""
    fmt = input_format(path, fmt)
    if fmt.startswith("parquet"):
        return ""
    fs, p = commit.fs_and_path(path)
    try:
        with fs.open(p, "rb", compression="gzip" if fmt.endswith(".gz") else None) as f:
            for n, line in enumerate(f, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f" (row {n - 1}, line {n}: bytes that are not UTF-8 at column {exc.start})"
    except OSError:
        return ""
    return ""


def _column_names(path: str, fmt: str) -> list[str] | None:
    """The URL list's columns, read from its header or first record (None for a JSON array: only parsing it all
    tells, and img2dataset's Reader does that next)."""
    fs, p = commit.fs_and_path(path)
    try:
        with fs.open(p, "rb", compression="gzip" if fmt.endswith(".gz") else None) as f:
            if fmt == "parquet":
                return pq.read_schema(f).names
            if fmt.startswith(("csv", "tsv")):
                parse = pa_csv.ParseOptions(delimiter="\t" if fmt.startswith("tsv") else ",")
                return pa_csv.open_csv(f, parse_options=parse).schema.names
            if fmt.startswith("jsonl"):
                first = f.readline()
                return list(json.loads(first)) if first.strip() else []
    except Exception as exc:  # noqa: BLE001 — the reason, with the file's name
        kind = "Parquet file" if fmt == "parquet" else f"{fmt} URL list"
        raise InputError(f"{path}: not a readable {kind} ({type(exc).__name__}: {exc}){_bad_utf8_line(path, fmt)}"
                         ) from exc
    return None


def _check_columns(path: str, cfg: DownloadConfig) -> None:
    """Name a missing column of the URL list before any download (img2dataset's Reader fails on it less clearly,
    or, for a txt list, reads past the option)."""
    fmt = input_format(path, cfg.input_format)
    if fmt.startswith("txt"):
        for key in ("verify_hash", "save_additional_columns"):
            if getattr(cfg, key):
                raise InputError(f"{path}: download.{key} names a column, but a txt URL list holds only URLs "
                                 "(one a line); use a csv, tsv, jsonl or parquet list")
        return
    names = _column_names(path, fmt)
    if names is None:
        return  # a JSON array: the Reader's KeyError becomes the same message in plan_shards
    wanted = [("url_col", cfg.url_col), ("caption_col", cfg.caption_col)]
    wanted += [("save_additional_columns", col) for col in cfg.save_additional_columns]
    wanted += [("verify_hash", cfg.verify_hash[0])] if cfg.verify_hash else []
    for key, col in wanted:
        if col and col not in names:
            raise InputError(f"{path}: column '{col}' of download.{key} not found (columns: {', '.join(names)})")
