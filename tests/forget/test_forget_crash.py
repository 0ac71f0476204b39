"""A crash at every step of a takedown's rewrite (after new files, after the receipt, after the marker switch,
between removing old files, inside an export partition, before the record) leaves every shard readable whole in its
old or its new generation, loses no other row; a rerun finishes the job into exactly what an uninterrupted takedown
gives, and untouched shards stay bitwise equal throughout. One crash is a real hard exit of the CLI process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from takedown_run import REPO, checksums, key, make_run
from test_forget import export_keys, image_keys, shard_files, side_rows, token_keys

from pipeline.config import load_config
from pipeline.forget import exported, rewrite
from pipeline.forget import run as forget_run
from pipeline.forget.run import run_forget
from pipeline.storage import commit


class Crash(BaseException):
    """Stands for the process dying at a fault point (raised past every ``except Exception``)."""


def _arm(monkeypatch, at: int) -> list[str]:
    """Crash at the ``at``-th fault point reached (-1: never); the points reached, in order."""
    seen: list[str] = []

    def point(where: str, n: int, rank: int = 0) -> None:
        seen.append(f"{where}:{n}")
        if len(seen) - 1 == at:
            raise Crash(seen[-1])

    for module in (commit, rewrite, exported, forget_run):
        monkeypatch.setattr(module, "fault_point", point)
    return seen


def _takedown(tmp_path) -> dict[str, str]:
    p = tmp_path / "keys.txt"
    p.write_text(f"{key(1, 3)}\n{key(1, 0)}\n")
    return {"keys": str(p)}


def _state(cfg) -> tuple:
    return image_keys(cfg), token_keys(cfg), side_rows(cfg), export_keys(cfg)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted takedown: its end state, shard 1's files, and every fault point it passes."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = make_run(str(tmp / "run"))
    mp = pytest.MonkeyPatch()
    seen = _arm(mp, -1)
    run_forget(cfg, _takedown(tmp))
    mp.undo()
    return _state(cfg), {k.split("@")[0]: v for k, v in shard_files(cfg, 1).items()}, list(seen)


def test_the_takedown_passes_every_fault_point(reference):
    points = [p.split(":")[0] for p in reference[2]]
    for name in ("forget-files", "forget-receipt", "generation-switched", "generation-removed",
                 "forget-export-img_emb", "forget-export-text_emb", "forget-export-metadata", "forget-record"):
        assert name in points
    assert points.count("generation-switched") == 3 and len(points) == 18  # images, tokens, the side table


@pytest.mark.parametrize("at", range(18))
def test_a_crash_at_any_step_then_a_rerun(tmp_path, monkeypatch, reference, at):
    state, _, points = reference
    if at >= len(points):
        pytest.fail(f"the takedown passes {len(points)} fault points; the test expects at least {at + 1}")
    cfg = make_run(str(tmp_path / "run"))
    original = _state(cfg)
    before0, before2 = shard_files(cfg, 0), shard_files(cfg, 2)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")  # the same bytes, taken down without a crash
    twin = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [f"run_dir={tmp_path / 'copy'}"])
    twin_out = run_forget(twin, _takedown(tmp_path))
    shard1 = {k.split("@")[0]: v for k, v in shard_files(twin, 1).items()}
    _arm(monkeypatch, at)
    with pytest.raises(Crash):
        run_forget(cfg, _takedown(tmp_path))
    monkeypatch.undo()
    images, tokens, side, _ = _state(cfg) if "export" not in points[at] else (*_state_no_export(cfg), None)
    for got, old, new in ((images[1], original[0][1], state[0][1]), (tokens, original[1], state[1]),
                          (set(side), set(original[2]), set(state[2]))):
        assert got in (old, new), f"a mix after a crash at {points[at]}"
    assert images[0] == original[0][0] and images[2] == original[0][2]  # no other row lost
    out = run_forget(cfg, _takedown(tmp_path))  # the rerun finishes the job
    assert _state(cfg) == state
    assert _record(out) == _record(twin_out)  # the record too: every receipt, even of shards switched before
    assert {k.split("@")[0]: v for k, v in shard_files(cfg, 1).items()} == shard1  # exactly the uninterrupted result
    assert shard_files(cfg, 0) == before0 and shard_files(cfg, 2) == before2
    requests = [n for n in os.listdir(cfg.path("takedowns")) if n.endswith(".request.json")]
    assert requests == ["00000.request.json"]  # the rerun finished the same takedown, it did not add one


def _record(out: dict) -> tuple:
    doc = json.loads(open(out["record"]).read())
    receipts = sorted((r["kind"], r["shard"], json.dumps(r["matched"], sort_keys=True), json.dumps(r["new"]))
                      for r in doc["receipts"])
    return doc["keys_removed"], doc["rewritten"], receipts, doc["refuse"]


def _state_no_export(cfg) -> tuple:
    return image_keys(cfg), token_keys(cfg), side_rows(cfg)


def test_a_hard_exit_of_the_cli_then_a_rerun(tmp_path):
    cfg = make_run(str(tmp_path / "run"))
    before = checksums(cfg.path("images"))
    cmd = [sys.executable, "-m", "pipeline", "forget", "--config", os.path.join(REPO, "configs", "tiny.yaml"),
           "--keys", _takedown(tmp_path)["keys"], "--in-process", f"run_dir={tmp_path / 'run'}"]
    env = dict(os.environ, PYTHONPATH=REPO, PIPELINE_FAULT="generation-switched:1")
    died = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert died.returncode == 17, died.stderr  # os._exit at the fault: no handler, the lease left behind
    assert checksums(cfg.path("images")) != before and key(1, 3) not in image_keys(cfg)[1]  # the switch happened
    assert key(1, 3) in token_keys(cfg)  # tokens still in their old generation, whole
    env.pop("PIPELINE_FAULT")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert key(1, 3) not in token_keys(cfg) | export_keys(cfg) and '"rows_removed": 2' in done.stdout
