"""The frozen data plan of a training run: the committed token shards, their row groups and (with a filter) the
rows each keeps, from Parquet footers alone (see ``pipeline.prior.loader`` for how the loader streams from it)."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.curate.filter import decode_mask, encode_mask, select_rows
from pipeline.prior.rows import DataError
from pipeline.storage import commit, schema

_FOOTER_THREADS = 16  # footers are tiny; on S3 their latency, not bandwidth, dominates plan time


@dataclass
class DataPlan:
    folder: str  # the tokens folder URL as given (local path or s3://...)
    shards: list[dict]  # [{"path": filesystem path, "shard": id, "row_groups": [rows per row group]}], id order
    meta: dict  # the SHARED_META fields every shard agrees on
    unit_rows: int
    selection: dict | None = None  # the run's filter, its clauses and kept/dropped counts; shards then hold "kept"

    @property
    def num_rows(self) -> int:
        """Rows the run trains on: those the filter kept (all rows without one)."""
        return sum(int(s["kept_rows"]) if "kept_rows" in s else sum(s["row_groups"]) for s in self.shards)

    def fingerprint(self) -> str:
        doc: list = [[s["path"], list(s["row_groups"])] for s in self.shards]
        if self.selection is not None:  # the filter and the very rows it kept (plans without one hash as before)
            doc.append([self.selection.get("filter"), [s.get("kept") for s in self.shards]])
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]

    def masks(self) -> list[np.ndarray] | None:
        """Per planned shard, which of its rows the filter kept (None: no filter, every row)."""
        if self.selection is None:
            return None
        return [decode_mask(s["kept"], sum(s["row_groups"])) for s in self.shards]

    def to_json(self) -> dict:
        return {"folder": self.folder, "shards": self.shards, "meta": self.meta, "unit_rows": self.unit_rows,
                **({"selection": self.selection} if self.selection is not None else {}),
                "fingerprint": self.fingerprint()}

    @classmethod
    def from_json(cls, d: dict) -> DataPlan:
        plan = cls(folder=d["folder"], shards=[dict(s, row_groups=[int(n) for n in s["row_groups"]])
                                               for s in d["shards"]], meta=d["meta"], unit_rows=int(d["unit_rows"]),
                   selection=d.get("selection"))
        if "fingerprint" in d and d["fingerprint"] != plan.fingerprint():
            raise DataError(f"{plan.folder}: recorded data plan does not match its fingerprint (edited?)")
        return plan


def _token_types_problem(sch: pa.Schema, images: bool = True) -> str | None:
    checks = {"key": pa.types.is_string,
              "text_tokens": lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type),
              "image_tokens": lambda t: pa.types.is_fixed_size_list(t) and pa.types.is_integer(t.value_type)}
    if not images:  # grid 0: imported embeddings, no image tokens (the diffusion prior's data)
        checks.pop("image_tokens")
    for name, ok in checks.items():
        i = sch.get_field_index(name)
        if i < 0 or not ok(sch.field(i).type):
            return f"column {name} missing or of type {sch.field(i).type if i >= 0 else None}"
    return None


def _footer(fs: Any, path: str, manifest: dict) -> tuple[list[int], dict, dict]:
    """Row-group row counts, shared metadata and the marker check (size, footer sha256) of one committed shard,
    from its Parquet footer alone."""
    try:
        check = schema.verify_token_shard(fs, path, manifest)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            md, sch = pf.metadata, pf.schema_arrow
    except FileNotFoundError as e:
        raise DataError(f"{path}: shard file missing although committed") from e
    except pa.ArrowException as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    raw = (sch.metadata or {}).get(schema.META_KEY)
    if raw is None:
        raise DataError(f"{path}: not a token shard (no {schema.META_KEY.decode()} metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{path}: not a token shard (unreadable {schema.META_KEY.decode()} metadata: {e})") from e
    grid = int(meta.get("grid") or 0)
    problem = _token_types_problem(sch, images=grid > 0 or "image_tokens" in sch.names)
    if problem:
        raise DataError(f"{path}: not a token shard ({problem})")
    width = sch.field("image_tokens").type.list_size if "image_tokens" in sch.names else 0
    if width != grid * grid:
        raise DataError(f"{path}: image_tokens rows hold {width} tokens but metadata grid {grid} means {grid * grid}")
    rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    return rows, {k: meta.get(k) for k in schema.SHARED_META}, check


def _footers(fs: Any, paths: list[str], manifests: list[dict]) -> list[tuple[list[int], dict, dict]]:
    with ThreadPoolExecutor(min(_FOOTER_THREADS, max(1, len(paths)))) as pool:
        return list(pool.map(lambda pm: _footer(fs, *pm), zip(paths, manifests)))  # first failure, in shard order


def _check_agrees(path: str, meta: dict, ref_name: str, ref: dict) -> None:
    diff = [k for k in schema.SHARED_META if meta.get(k) != ref.get(k)]
    if diff:
        raise DataError(f"{path}: metadata {diff} disagrees with {ref_name}; refusing to mix token shards")


def make_plan(folder: str, unit_rows: int, filter: str = "", filter_key: str = "prior.filter") -> DataPlan:
    """Freeze the committed shards of ``folder`` and their row-group row counts (footers only); with ``filter`` (a
    SQL condition, ``pipeline.curate.filter``) also the rows it keeps, evaluated once here."""
    if unit_rows < 1:
        raise ValueError(f"unit_rows must be >= 1, got {unit_rows}")
    fs, path = commit.fs_and_path(folder)
    committed = commit.committed_shards(fs, path)
    ids = list(committed)
    if not ids:
        raise DataError(f"{folder}: no committed token shards")
    paths = [commit.shard_file(path, i, ".parquet", committed[i]) for i in ids]
    footers = _footers(fs, paths, [committed[i] for i in ids])  # each checked against its marker
    for p, (_, meta, _) in zip(paths, footers):
        _check_agrees(p, meta, paths[0], footers[0][1])
    shards = [{"path": p, "shard": i, "row_groups": rows, **check}
              for p, i, (rows, _, check) in zip(paths, ids, footers)]
    plan = DataPlan(folder=folder, shards=shards, meta=footers[0][1], unit_rows=unit_rows)
    if filter:
        chosen = select_rows(folder, shards, filter, filter_key)
        for s in shards:
            s["kept"], s["kept_rows"] = encode_mask(chosen["masks"][s["shard"]]), int(chosen["masks"][s["shard"]].sum())
        plan.selection = chosen["record"]
    return plan


def check_plan(plan: DataPlan) -> None:
    """On resume: each planned shard still exists, is committed, agrees with the plan's metadata and row counts."""
    fs, path = commit.fs_and_path(plan.folder)
    committed = commit.committed_shards(fs, path)
    for s in plan.shards:
        if s["shard"] not in committed:
            raise DataError(f"{s['path']}: in the training plan but no longer committed (its marker is gone)")
    found = _footers(fs, [s["path"] for s in plan.shards], [committed[s["shard"]] for s in plan.shards])
    for s, (rows, meta, check) in zip(plan.shards, found):
        if s.get("footer_sha256") and check["footer_sha256"] != s["footer_sha256"]:  # marker rewritten with it
            raise DataError(f"{s['path']}: rewritten since the plan was made (its Parquet footer changed); resume "
                            "with the data the checkpoint was trained on, or train into a new prior.output")
        if rows != list(s["row_groups"]):
            bad = next((i for i, (a, b) in enumerate(zip(rows, s["row_groups"])) if a != b),
                       min(len(rows), len(s["row_groups"])))
            raise DataError(f"{s['path']}: rewritten since the plan was made: {len(rows)} row groups / {sum(rows)} "
                            f"rows (first difference at row group {bad}), the plan recorded "
                            f"{len(s['row_groups'])} / {sum(s['row_groups'])}")
        _check_agrees(s["path"], meta, "the training plan", plan.meta)
