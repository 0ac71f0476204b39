"""Which models saw a removed row: every prior, diffusion-prior and decoder run of the config, each complete
checkpoint, whether its training consumed one of the removed rows and at which step first; the dVAE's too.

A trainer freezes its data plan (shards, row groups, footer hashes, the filter's kept rows) and its order's inputs
(seed, ranks, micro batch, shuffle buffer, gradient accumulation) in each checkpoint, and the order is a pure function
of them (``pipeline.prior.loader``), so the first step that read a row is computed from the plan alone
(``TokenLoader.first_step``), for every rank; where the run kept a consumed-keys audit (``prior.record_keys``:
``keys.rank{r}.txt``, one ``step<TAB>key`` per row) that is read instead. Steps are counted from 1, as checkpoints
are: checkpoint ``step00000040`` consumed the row iff its first step is <= 40. A row the run held out
(``heldout_percent`` of the diffusion prior and the decoder, by key hash) is read but masked out of every loss: it is
listed as read, not consumed. A plan made from a generation of a
token shard older than the one the takedown rewrote cannot place the row: it says so, and does not call it clean.

The dVAE freezes no plan (it streams every committed image shard of its run): a dVAE trained on an image shard this
takedown rewrote is reported as having possibly seen the rows, with no step.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline.config import Config
from pipeline.prior.loader import DataPlan, TokenLoader, heldout_mask
from pipeline.storage import commit, urls
from pipeline.storage.checkpoints import Checkpoints
from pipeline.storage.weights import DVAE_FILE

log = logging.getLogger(__name__)
TRAINERS = (("prior", "prior"), ("prior_diffusion", "diffusion"), ("decoder", "decoder"))


def _token_rows(receipts: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, int]]:
    """(token shard, footer of the generation the rows were in) → removed key → its row there."""
    out: dict[tuple[int, str], dict[str, int]] = {}
    for r in receipts:
        if r["kind"] == "tokens":
            rows = {m["key"]: int(m["row"]) for m in r["matched"] if "row" in m and not m.get("rejected")}
            out[(int(r["shard"]), str(r["old"].get("footer_sha256")))] = rows
    return out


def _audit(folder: str, world: int, removed: set[str]) -> dict[str, int] | None:
    """Removed key → first step (from 1) in the run's consumed-keys audit files, or None without them."""
    found: dict[str, int] = {}
    any_file = False
    for rank in range(world):
        path = urls.join(folder, f"keys.rank{rank}.txt")
        if not urls.exists(path):
            continue
        any_file = True
        for line in urls.read_bytes(path).decode().splitlines():
            step, _, key = line.partition("\t")
            if key in removed and step.isdigit():
                found[key] = min(found.get(key, 1 << 62), int(step) + 1)
    return found if any_file else None


def _planned(plan: DataPlan, rows: dict[tuple[int, str], dict[str, int]]) -> tuple[list[tuple[int, str, int]], list]:
    """(planned shard index, key, row) of each removed row the plan holds; planned shards the takedown rewrote from
    another generation than the plan's (the rows cannot be placed)."""
    rewritten = {sid for sid, _ in rows}
    found, unplaced = [], []
    for i, s in enumerate(plan.shards):
        hit = rows.get((int(s["shard"]), str(s.get("footer_sha256"))))
        if hit is not None:
            found += [(i, key, row) for key, row in hit.items()]
        elif int(s["shard"]) in rewritten:
            unplaced.append(int(s["shard"]))
    return found, unplaced


def _first_steps(cfg_doc: dict[str, Any], section: str, plan: DataPlan, world: int, found: list, until: int,
                 ) -> dict[str, int]:
    sec = cfg_doc[section]
    gas = int(sec.get("gradient_accumulation_steps") or 1)
    out: dict[str, int] = {}
    for rank in range(world):
        loader = TokenLoader(plan, rank=rank, world=world, micro_batch=int(sec["micro_batch_size"]),
                             text_len=int(sec["text_len"]), seed=int(cfg_doc["seed"]),
                             shuffle_buffer=int(sec["shuffle_buffer"]))
        for i, key, row in found:
            s = loader.first_step(i, row, until * gas)
            if s is not None:
                out[key] = min(out.get(key, 1 << 62), s // gas + 1)
    return out


def checkpoint_report(folder: str, section: str, tag: str, removed: set[str], rows: dict) -> dict[str, Any]:
    """One checkpoint: its step, the removed keys it consumed with their first step, or why it cannot say."""
    state = json.loads(urls.read_bytes(urls.join(folder, tag, "train_state.json")))
    complete = json.loads(urls.read_bytes(urls.join(folder, tag, "complete.json")))
    step, world = int(state["step"]), int(complete.get("world_size") or 1)
    plan = DataPlan.from_json(state["data_plan"])
    found, unplaced = _planned(plan, rows)
    audit = _audit(folder, world, removed)
    cfg_doc = json.loads(urls.read_bytes(urls.join(folder, tag, "config.json")))
    if audit is not None:
        first, how = {k: s for k, s in audit.items() if s <= step}, "keys audit"
    else:
        first, how = _first_steps(cfg_doc, section, plan, world, found, step), "data plan"
    pct = float(cfg_doc.get(section, {}).get("heldout_percent") or 0) if state.get("kind") != "ar" else 0.0
    held = {k for k, h in zip(first, heldout_mask(list(first), pct)) if h}  # read, masked out of every loss
    out: dict[str, Any] = {"step": step, "consumed": {k: s for k, s in sorted(first.items()) if k not in held},
                           "how": how}
    out["first_step"] = min(out["consumed"].values()) if out["consumed"] else None
    if held:
        out["read_not_trained"] = sorted(held)
    first = out["consumed"]
    if unplaced and audit is None:
        out["unplaced_shards"] = unplaced
    out["clean"] = not first and not out.get("unplaced_shards")
    return out


def models_report(cfg: Config, removed: set[str], receipts: list[dict[str, Any]]) -> dict[str, Any]:
    """Every trainer output of ``cfg`` with complete checkpoints → their checkpoints' exposure; and the dVAE."""
    rows = _token_rows(receipts)
    report: dict[str, Any] = {}
    for stage, section in TRAINERS:
        folder = cfg.path(stage)
        tags = Checkpoints(folder).complete()
        if not tags:
            continue
        checkpoints = {t: checkpoint_report(folder, section, t, removed, rows) for t in tags}
        report[folder] = {"kind": stage, "checkpoints": checkpoints,
                          "saw": [t for t, c in checkpoints.items() if not c["clean"]],
                          "clean": [t for t, c in checkpoints.items() if c["clean"]]}
    images_rewritten = any(r["kind"] == "images" for r in receipts)
    dvae = cfg.path("dvae")
    if images_rewritten and urls.exists(urls.join(dvae, DVAE_FILE)):
        report[dvae] = {"kind": "dvae", "saw": [DVAE_FILE], "clean": [], "how": "no frozen plan: it streamed every "
                        "committed image shard, including the rewritten ones, so it may have seen the rows"}
    grids = _grids(cfg) if removed else []
    if grids:  # pictures of held-out rows drawn before the takedown: forget does not redraw them
        report["pictures"] = {"kind": "pictures", "may_show": grids, "saw": [], "clean": []}
    return report


def _grids(cfg: Config) -> list[str]:
    """Reconstruction grids the trainers and evaluations drew from dataset rows (they may show a removed image)."""
    found = []
    for folder, pattern in ((cfg.path("dvae"), "recon_step*.png"), (cfg.path("dvae"), "eval_reconstructions.png"),
                            (urls.join(cfg.path("decoder"), "eval"), "reconstructions.png")):
        fs, path = commit.fs_and_path(folder)
        if fs.exists(path):
            found += [fs.unstrip_protocol(p) if "://" in folder else p for p in sorted(fs.glob(f"{path}/{pattern}"))]
    return found


def format_report(report: dict[str, Any]) -> list[str]:
    """One line per run: which checkpoints consumed a removed row (first step), which are clean."""
    lines = []
    for folder, r in report.items():
        if r["kind"] == "dvae":
            lines.append(f"{folder} (dvae): may have seen removed rows ({r['how']})")
            continue
        if r["kind"] == "pictures":
            lines.append(f"reconstruction grids drawn from dataset rows, which may show a removed image (not redrawn):"
                         f" {', '.join(r['may_show'])}")
            continue
        saw = ", ".join(f"{t} (first at step {r['checkpoints'][t]['first_step']})"
                        if r["checkpoints"][t]["first_step"] else f"{t} (cannot place the rows)" for t in r["saw"])
        lines.append(f"{folder} ({r['kind']}): saw removed rows: {saw or 'none'}; clean: "
                     f"{', '.join(r['clean']) or 'none'}")
    return lines
