"""Per-run filters over token shards: a DuckDB SQL ``WHERE`` clause over any column, evaluated once into a run's
frozen data plan. No token shard is rewritten.

    prior.filter: "clip_similarity >= 0.28 and punsafe < 0.1 and width >= 256 and duplicate_of is null"

* Syntax. DuckDB's SQL expression grammar (``json_serialize_sql`` parses it; a syntax error is shown with a caret
  under the place). One expression, no subqueries; DuckDB runs with external access off and its configuration
  locked, so a predicate cannot read or write files.
* Columns. Every column of the token shards (v1, plus a shard's additional columns recorded in its
  ``extra_columns`` metadata) and, where ``python -m pipeline dedup`` has committed its side table
  (``<tokens>/_dedup``), ``cluster``, ``duplicate_of`` and ``cosine``, joined by key. Names compare
  case-insensitively, as SQL does. A name no shard has is refused listing the available ones; a name some planned
  shards lack, or whose type differs between shards, is refused naming the shard: shards with different additional
  columns mix only where the columns a run uses agree.
* Counts. The top-level ``and`` splits the predicate into clauses; each clause is evaluated on every row, so the
  plan records per clause how many rows it keeps and drops on its own, and how many it drops of those the clauses
  before it kept (the cascade), and the total. A predicate that keeps no row is refused with those counts. NULL is
  not true: a row whose value is null fails a comparison (``punsafe < 0.1`` drops rows without punsafe; write
  ``punsafe is null or punsafe < 0.1`` to keep them).
* Masks. Per shard a bitmap of the kept rows (``encode_mask``), stored in the plan and its fingerprint, so exact
  resume and rank dealing are computed over the kept rows only and never re-evaluated.
"""

from __future__ import annotations

import base64
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DataError, FilterError
from pipeline.storage import commit, schema

DEDUP_FOLDER = "_dedup"  # the dedup side table, inside the token folder it describes
DEDUP_COLUMNS = ("cluster", "duplicate_of", "cosine")
_PREFIX = "SELECT * FROM t WHERE "
_THREADS = 4  # shards read at once (pyarrow releases the GIL)
BATCH_ROWS = 2_000_000  # rows evaluated by one DuckDB query


@dataclass(frozen=True)
class Predicate:
    text: str
    clauses: tuple[str, ...]  # each top-level AND term as DuckDB prints it back
    columns: tuple[str, ...]  # the column names it references, as written, first use first


def _connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can read no file and whose settings are locked (a filter cannot change them)."""
    con = duckdb.connect(config={"enable_external_access": False})
    con.execute("SET lock_configuration = true").fetchall()
    return con


def _serialize(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    return json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])


def _deserialize(con: duckdb.DuckDBPyConnection, doc: dict[str, Any]) -> str:
    return con.execute("SELECT json_deserialize_sql(?)", [json.dumps(doc)]).fetchall()[0][0]


def _walk(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        found.append(node)
        for v in node.values():
            found += _walk(v)
    elif isinstance(node, list):
        for v in node:
            found += _walk(v)
    return found


def parse_predicate(text: str, key: str = "prior.filter") -> Predicate:
    """``text`` checked as one SQL boolean expression and split at its top-level ``and``s."""
    if not text.strip():
        raise FilterError(f"config key '{key}': the filter is empty")
    con = _connect()
    try:
        return _parse(con, text, key)
    finally:
        con.close()


def check_syntax(text: str, key: str) -> None:
    """A config's filter, parsed when the config loads: its errors are configuration errors."""
    from pipeline.errors import ConfigError

    try:
        parse_predicate(text, key)
    except FilterError as exc:
        raise ConfigError(str(exc)) from None


def _parse(con: duckdb.DuckDBPyConnection, text: str, key: str) -> Predicate:
    doc = _serialize(con, _PREFIX + text)
    if doc.get("error") and doc.get("error_type") != "parser":
        raise FilterError(f"config key '{key}': {text!r} is not one SQL expression (a WHERE clause's condition)")
    if doc.get("error"):
        at = int(doc.get("position") or len(_PREFIX)) - len(_PREFIX)
        at = min(max(at, 0), len(text))
        raise FilterError(f"config key '{key}': {doc.get('error_message')} at character {at}:\n  {text}\n  "
                          + " " * at + "^")
    statements = doc.get("statements") or []
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    where = node.get("where_clause")
    if len(statements) != 1 or where is None or any(k for k in ("group_expressions", "modifiers") if node.get(k)):
        raise FilterError(f"config key '{key}': {text!r} is not one SQL expression (a WHERE clause's condition)")
    nodes = _walk(where)
    if any(n.get("class") == "SUBQUERY" or n.get("type") == "SUBQUERY" for n in nodes):
        raise FilterError(f"config key '{key}': subqueries are not allowed in a filter ({text!r})")
    columns: list[str] = []
    for n in nodes:
        if n.get("class") == "COLUMN_REF":
            name = n["column_names"][-1]
            if name.lower() not in {c.lower() for c in columns}:
                columns.append(name)
    terms = where["children"] if where.get("type") == "CONJUNCTION_AND" else [where]
    clauses = []
    for term in terms:
        one = json.loads(json.dumps(doc))
        one["statements"][0]["node"]["where_clause"] = term
        sql = _deserialize(con, one)
        clauses.append(sql[sql.upper().index(" WHERE ") + 7:].strip())
    return Predicate(text, tuple(clauses), tuple(columns))


def encode_mask(mask: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.packbits(mask.astype(bool)).tobytes(), 6)).decode()


def decode_mask(text: str, rows: int) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8)
    return np.unpackbits(bits, count=rows).astype(bool)


def dedup_shards(tokens: str) -> dict[int, dict[str, Any]]:
    """The committed shards of the dedup side table of the token folder ``tokens`` ({} when there is none)."""
    fs, path = commit.fs_and_path(commit.join(tokens, DEDUP_FOLDER))
    return commit.committed_shards(fs, path)


def _schema_of(fs: Any, path: str) -> pa.Schema:
    with fs.open(path, "rb") as f:
        return schema.open_token_shard(f).schema_arrow


def _resolve(pred: Predicate, shards: list[dict], schemas: list[pa.Schema], dedup: dict[int, dict], key: str,
             folder: str) -> dict[str, tuple[str, str]]:
    """Each referenced name → (its column name in the files, 'tokens' or 'dedup'), checked in every planned shard:
    present and of one type."""
    everywhere: dict[str, str] = {}
    for sch in schemas:
        everywhere.update({n.lower(): n for n in sch.names})
    if dedup:
        everywhere.update({c: c for c in DEDUP_COLUMNS})
    out = {}
    for name in pred.columns:
        if name.lower() not in everywhere:
            hint = (f"; {name} comes from the dedup side table, which {folder} does not have yet: run "
                    "`python -m pipeline dedup` first") if name.lower() in DEDUP_COLUMNS else ""
            raise FilterError(f"config key '{key}': unknown column '{name}' in {pred.text!r}; available: "
                              f"{', '.join(sorted(set(everywhere.values()), key=str.lower))}{hint}")
        real = everywhere[name.lower()]
        if real in DEDUP_COLUMNS and not any(real in s.names for s in schemas):
            missing = [s["shard"] for s in shards if s["shard"] not in dedup]
            if missing:
                raise FilterError(f"config key '{key}': {folder}/{DEDUP_FOLDER} has no committed side table for "
                                  f"token shard(s) {missing[:5]} (dedup ran before they were committed); rerun "
                                  "`python -m pipeline dedup`")
            out[name] = (real, "dedup")
            continue
        types = {}
        for s, sch in zip(shards, schemas):
            if real not in sch.names:
                raise FilterError(f"config key '{key}': column '{real}' is not in {s['path']} (its columns: "
                                  f"{', '.join(sch.names)}); shards read together must all have the columns a "
                                  "filter uses")
            types.setdefault(str(sch.field(real).type), s["path"])
        if len(types) > 1:
            raise FilterError(f"config key '{key}': column '{real}' has different types in the planned shards: "
                              + "; ".join(f"{t} in {p}" for t, p in types.items()))
        out[name] = (real, "tokens")
    return out


def _shard_table(fs: Any, s: dict, cols: dict[str, tuple[str, str]], tokens: str, dedup: dict[int, dict]) -> pa.Table:
    tok = sorted({"key", *(real for real, src in cols.values() if src == "tokens")})
    with fs.open(s["path"], "rb") as f:
        try:
            table = schema.open_token_shard(f).read(columns=tok)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{s['path']}: unreadable although committed ({exc})") from exc
    side = sorted({real for real, src in cols.values() if src == "dedup"})
    if side:
        marker = dedup[s["shard"]]
        dfs, dpath = commit.fs_and_path(commit.shard_file(commit.join(tokens, DEDUP_FOLDER), s["shard"], ".parquet",
                                                          marker))
        schema.verify_token_shard(dfs, dpath, marker)  # the side table as committed
        if marker.get("token_shard") not in (s.get("footer_sha256"), s.get("sha256"), None):
            raise DataError(f"{dpath}: made from another version of {s['path']} (its footer changed since); rerun "
                            "`python -m pipeline dedup` into a fresh _dedup folder")
        with dfs.open(dpath, "rb") as f:
            d = schema.open_token_shard(f).read(columns=["key", *side])
        if d.column("key").to_pylist() != table.column("key").to_pylist():
            raise DataError(f"{dpath}: its keys are not those of {s['path']}; rerun `python -m pipeline dedup`")
        for c in side:
            table = table.append_column(c, d.column(c))
    return table


def _evaluate(con: duckdb.DuckDBPyConnection, table: pa.Table, pred: Predicate, key: str, path: str) -> np.ndarray:
    """(clauses, rows) bool: each clause on each row of ``table``, NULL counted as false."""
    try:
        con.register("t", table)
        select = ", ".join(f"COALESCE(CAST(({c}) AS BOOLEAN), false) AS c{i}" for i, c in enumerate(pred.clauses))
        out = con.sql(f"SELECT {select} FROM t").to_arrow_table()
    except duckdb.Error as exc:
        first = str(exc).split("\n")[0]
        raise FilterError(f"config key '{key}': {pred.text!r} cannot be evaluated on {path}: {first}") from exc
    finally:
        con.unregister("t")
    if out.num_rows != table.num_rows:
        raise DataError(f"{path}: the filter returned {out.num_rows} rows for {table.num_rows}")
    cols = [pc.fill_null(out.column(i), False).to_numpy(zero_copy_only=False) for i in range(len(pred.clauses))]
    return np.stack(cols).reshape(len(pred.clauses), table.num_rows)


def _batches(tables: Any, limit: int) -> Any:
    """Consecutive (shards, tables) groups of at most ``limit`` rows (one or more whole shards each)."""
    group: list[tuple[dict, pa.Table]] = []
    rows = 0
    for s, t in tables:
        if group and rows + t.num_rows > limit:
            yield group
            group, rows = [], 0
        group.append((s, t))
        rows += t.num_rows
    if group:
        yield group


def select_rows(folder: str, shards: list[dict], text: str, key: str = "prior.filter") -> dict[str, Any]:
    """Evaluate the filter ``text`` on the planned ``shards`` (``{"path", "shard", "row_groups"}``) of the token
    folder ``folder``: the plan's selection record and the per-shard masks. Refuses a filter that keeps no row."""
    pred = parse_predicate(text, key)
    fs, _ = commit.fs_and_path(folder)
    with ThreadPoolExecutor(min(16, max(1, len(shards)))) as pool:
        schemas = list(pool.map(lambda s: _schema_of(fs, s["path"]), shards))
    dedup = dedup_shards(folder) if any(c.lower() in DEDUP_COLUMNS for c in pred.columns) else {}
    cols = _resolve(pred, shards, schemas, dedup, key, folder)

    def read(s: dict) -> pa.Table:
        table = _shard_table(fs, s, cols, folder, dedup)
        if table.num_rows != sum(s["row_groups"]):
            raise DataError(f"{s['path']}: {table.num_rows} rows, the plan recorded {sum(s['row_groups'])}")
        return table

    out = _select(pred, shards, cols, read, key, folder)
    dedup_marks = {str(s["shard"]): dedup[s["shard"]].get("footer_sha256") for s in shards if s["shard"] in dedup}
    if dedup_marks:
        out["record"]["dedup"] = dedup_marks
    return out


def check_columns(folder: str, text: str, key: str) -> None:
    """Before any rank starts: the filter's columns exist in every committed token shard of ``folder`` (and the
    dedup side table where it names its columns), with one type each; reads footers only."""
    pred = parse_predicate(text, key)
    fs, path = commit.fs_and_path(folder)
    shards = [{"path": commit.shard_file(path, sid, ".parquet", m), "shard": sid}
              for sid, m in commit.committed_shards(fs, path).items()]  # the generation each marker commits
    if not shards:
        return  # the plan names the empty folder itself
    with ThreadPoolExecutor(min(16, len(shards))) as pool:
        schemas = list(pool.map(lambda s: _schema_of(fs, s["path"]), shards))
    dedup = dedup_shards(folder) if any(c.lower() in DEDUP_COLUMNS for c in pred.columns) else {}
    _resolve(pred, shards, schemas, dedup, key, folder)


def select_image_rows(folder: str, counts: dict[int, int], text: str, key: str = "dvae.filter") -> dict[str, Any]:
    """The same over committed *image* shards (the dVAE's data): the columns of each shard's img2dataset metadata
    Parquet (``original_width``, ``original_height``, ``width``/``height`` = the resized size, the additional
    columns, ...), on its successful rows in key order, as the shard's readers list its images."""
    from pipeline.storage import shards as image_shards

    pred = parse_predicate(text, key)
    fs, path = commit.fs_and_path(folder)
    markers = image_shards.committed_image_shards(folder)
    items = [{"path": f"{path}/{image_shards.shard_stem(sid, markers[sid].get('files', {}))}.parquet", "shard": sid}
             for sid in counts]
    with ThreadPoolExecutor(min(16, max(1, len(items)))) as pool:
        schemas = list(pool.map(lambda s: _schema_of(fs, s["path"]), items))
    cols = _resolve(pred, items, schemas, {}, key, folder)

    def read(s: dict) -> pa.Table:
        table = image_shards.read_shard_metadata(folder, s["shard"], markers[s["shard"]].get("files", {}),
                                                 [real for real, _ in cols.values()])
        if table.num_rows != counts[s["shard"]]:
            raise DataError(f"{s['path']}: {table.num_rows} successful rows, its marker records "
                            f"{counts[s['shard']]}")
        return table

    return _select(pred, items, cols, read, key, folder)


def _select(pred: Predicate, shards: list[dict], cols: dict[str, tuple[str, str]], read: Any, key: str,
            folder: str) -> dict[str, Any]:
    """Shards read a few at a time in threads (``read``: shard → its table) and evaluated together, BATCH_ROWS at a
    time: one DuckDB query (itself multi-threaded) per batch, not per shard; memory holds one batch of the
    predicate's columns. The selection record and the per-shard masks."""
    names = [real for real, _ in cols.values()]

    def load(s: dict) -> tuple[dict, pa.Table]:
        return s, read(s).select(names).replace_schema_metadata(None)

    results: list[np.ndarray] = []
    con = _connect()
    try:
        with ThreadPoolExecutor(min(_THREADS, max(1, len(shards)))) as pool:
            for group in _batches(pool.map(load, shards), BATCH_ROWS):
                try:
                    both = _evaluate(con, pa.concat_tables([t for _, t in group]), pred, key, group[0][0]["path"])
                except FilterError:
                    for s, t in group:  # name the first shard it fails on (types agree, so usually the first)
                        _evaluate(con, t, pred, key, s["path"])
                    raise
                edges = np.cumsum([0] + [t.num_rows for _, t in group])
                results += [both[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
    finally:
        con.close()
    counts = selection_counts(pred, results)
    if counts["kept"] == 0:
        raise FilterError(f"config key '{key}': {pred.text!r} keeps none of the {counts['rows']} rows of {folder}; "
                          "refusing to train. Per clause: " + "; ".join(
                              f"{c['clause']}: keeps {c['kept']}, drops {c['dropped']}" for c in counts["clauses"]))
    masks = {s["shard"]: r.all(axis=0) for s, r in zip(shards, results)}
    record = {"filter": pred.text, "clauses": list(pred.clauses), "columns": sorted(set(names)), "counts": counts}
    return {"record": record, "masks": masks}


def selection_counts(pred: Predicate, results: list[np.ndarray]) -> dict[str, Any]:
    """Rows kept and dropped: by each clause alone, by each clause after the ones before it, and in all."""
    n = sum(r.shape[1] for r in results)
    alone = [int(sum(r[i].sum() for r in results)) for i in range(len(pred.clauses))]
    cascade, before = [], [np.ones(r.shape[1], bool) for r in results]
    for i in range(len(pred.clauses)):
        after = [b & r[i] for b, r in zip(before, results)]
        cascade.append(int(sum(b.sum() for b in before) - sum(a.sum() for a in after)))
        before = after
    kept = int(sum(b.sum() for b in before))
    return {"rows": n, "kept": kept, "dropped": n - kept,
            "clauses": [{"clause": c, "kept": k, "dropped": n - k, "dropped_after_previous": d}
                        for c, k, d in zip(pred.clauses, alone, cascade)]}


# ---- a run's record of its selection (``DataPlan.selection``) -------------------------------------------------
SELECTION_FILE = "data_filter.json"


def write_selection(plan: Any, ws: Any, prefix: str) -> None:
    """Rank 0: the run's filter with its rows kept/dropped per clause, beside the run's metrics (and one line)."""
    if plan.selection is None:
        return
    c = plan.selection["counts"]
    with open(ws.at(SELECTION_FILE), "w") as f:
        json.dump(plan.selection, f, indent=1)
    ws.push(SELECTION_FILE)
    print(f"{prefix} filter {plan.selection['filter']!r}: {c['kept']} of {c['rows']} rows kept ("
          + "; ".join(f"{x['clause']} drops {x['dropped']}" for x in c["clauses"]) + ")", flush=True)


def read_selection(out: str) -> dict:
    """{"filter": the counts} of a trained run's output folder, {} when it trained on every row."""
    from pipeline.storage.urls import exists, join

    path = join(out, SELECTION_FILE)
    if not exists(path):
        return {}
    fs, p = commit.fs_and_path(path)
    with fs.open(p, "rb") as f:
        doc = json.loads(f.read())
    return {"filter": {"filter": doc["filter"], **doc["counts"]}}


def check_filter(plan: Any, filter: str, key: str, where: str) -> None:
    """On resume: the run's filter is the one its plan froze (a changed filter would change which rows are read)."""
    frozen = (plan.selection or {}).get("filter", "")
    if frozen != filter:
        raise DataError(f"{where}: the checkpoint's data plan was made with {key}={frozen!r}, this config has "
                        f"{filter!r}; resume with the filter it was trained on, or train into a new output")
