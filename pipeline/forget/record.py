"""The run's takedown record, ``<run>/takedowns/``, append-only: each takedown ``NNNNN`` is

* ``NNNNN.request.json``: what was asked and when, written before any shard is touched (so from that moment a
  download into the run refuses those rows, even if the takedown itself is interrupted);
* ``NNNNN/<kind>-<shard>.json``: one receipt per rewritten shard (rows matched, old and new checksums), written
  before that shard's switch;
* ``NNNNN.json``: the record, written last (its commit marker): every receipt, the totals, the models that saw a
  removed row. A request without it is a takedown still to finish: the next ``forget`` finishes it first.

Every file is written whole or not at all (``commit.atomic_write``); no file of the record is ever rewritten but the
request's own receipts by a rerun of that request.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from pipeline.forget.request import Selectors
from pipeline.forget.rewrite import Journal
from pipeline.storage import commit

_REQUEST = re.compile(r"^(\d{5})\.request\.json$")


def _ids(folder: str) -> list[str]:
    fs, path = commit.fs_and_path(folder)
    if not fs.exists(path):
        return []
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(m.group(1) for n in names if (m := _REQUEST.match(n)))


def _read(folder: str, name: str) -> dict[str, Any] | None:
    fs, path = commit.fs_and_path(folder)
    try:
        return json.loads(fs.cat_file(f"{path}/{name}"))
    except FileNotFoundError:
        return None


def request(folder: str, tid: str) -> dict[str, Any]:
    doc = _read(folder, f"{tid}.request.json")
    assert doc is not None, tid
    return doc


def record(folder: str, tid: str) -> dict[str, Any] | None:
    """The finished record of takedown ``tid``, or None while it is unfinished."""
    return _read(folder, f"{tid}.json")


def pending(folder: str) -> list[str]:
    """Takedowns asked but not finished (a crash, or a refusal halfway), oldest first."""
    return [t for t in _ids(folder) if record(folder, t) is None]


def start(folder: str, sel: Selectors, asked: dict[str, Any]) -> str:
    """Record a new request (the caller holds the run's writer leases); its id."""
    ids = _ids(folder)
    tid = f"{int(ids[-1]) + 1 if ids else 0:05d}"
    doc = {"takedown": tid, "asked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "asked": asked,
           "selectors": sel.to_json(), "fingerprint": sel.fingerprint()}
    fs, path = commit.fs_and_path(folder)
    fs.makedirs(path, exist_ok=True)
    commit.atomic_write(fs, f"{path}/{tid}.request.json", json.dumps(doc, indent=1, sort_keys=True).encode())
    return tid


def finish(folder: str, tid: str, doc: dict[str, Any]) -> None:
    fs, path = commit.fs_and_path(folder)
    commit.atomic_write(fs, f"{path}/{tid}.json", json.dumps(doc, indent=1, sort_keys=True).encode())


def selectors_of(folder: str, tid: str) -> Selectors:
    """What takedown ``tid`` removes: its request, and the digests of every row its receipts matched (a key named
    by the request also refuses that row's URL and image bytes)."""
    sel = Selectors.from_json(request(folder, tid)["selectors"])
    done = record(folder, tid)
    receipts = done["receipts"] if done is not None else Journal(folder, tid).all()
    for r in receipts:
        for row in r.get("matched", []):
            sel.keys.add(row["key"])
            if row.get("url_sha256"):
                sel.url_sha256.add(row["url_sha256"])
            if row.get("sha256"):
                sel.sha256.add(row["sha256"])
    return sel


def refusals(folder: str) -> Selectors:
    """Everything every takedown of the run asked for or matched: what a download must never fetch or keep again,
    and what tokenize must never bring back."""
    sel = Selectors()
    for tid in _ids(folder):
        sel.update(selectors_of(folder, tid))
    return sel
