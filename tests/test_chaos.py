"""Chaos: download → tokenize → train-prior on a few hundred rows, each stage a real command (its own driver, local
Ray cluster and deepspeed ranks), killed at seeded random points — the driver, a worker process, a rank; inside
shard and token commits and checkpoint saves — and rerun until it finishes. The end result must equal a clean run's:
the same images, the same tokens, the same consumed keys, the same losses. Prints every kill point."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import make_tiny_models

from pipeline.config import load_config
from pipeline.demo import synth
from pipeline.demo.server import ImageServer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
N, SHARD, STEPS, SEED = 150, 15, 24, 20261202


def _overrides(run: Path, urls: Path, models: Path) -> list[str]:
    return [f"run_dir={run}", f"download.input={urls}", "download.allow_private_addresses=true",
            f"download.shard_size={SHARD}", "download.max_in_flight=2", "download.thread_count=4",
            f"dvae.output={models / 'dvae'}", f"clip.output={models / 'clip'}", "tokenize.batch_size=8",
            f"prior.steps={STEPS}", "prior.save_every=4", "prior.log_every=1", "prior.record_keys=true",
            "prior.keep_checkpoints=8", "prior.micro_batch_size=8", "prior.loader_unit_rows=8",
            "prior.shuffle_buffer=32", "prior.text_len=8"]


def _start(stage: str, args: list[str], fault: str = "") -> subprocess.Popen:
    env = {**os.environ, "PIPELINE_FAULT": fault} if fault else dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # each command starts (and owns) its local cluster, as a user's would
    return subprocess.Popen([sys.executable, "-m", "pipeline", stage, "--config", "configs/tiny.yaml", *args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    proc.stderr_text = err  # type: ignore[attr-defined]
    return proc.returncode


def _kill_matching(proc: subprocess.Popen, needle: str, deadline_s: float) -> bool:
    """SIGKILL one descendant process of ``proc`` whose command line holds ``needle`` once one is running."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if needle in " ".join(child.cmdline()):
                    child.kill()
                    return True
            except psutil.Error:
                continue
        time.sleep(0.05)
    return False


def _committed(folder: Path) -> int:
    return len(list(folder.glob("*.done.json")))


def _checkpoint_at_least(prior: Path, step: int) -> bool:
    pointer = prior / "latest_complete"
    return pointer.exists() and int(pointer.read_text().strip().removeprefix("step") or 0) >= step


def _run_with_kills(stage: str, args: list[str], run: dict, kills: list[str]) -> int:
    """One run of ``stage`` with its planned kills: a fault point (``fault``), SIGKILL of a worker process
    (``worker``: a command-line needle) and SIGKILL of the driver once ``driver`` (a predicate) holds."""
    proc = _start(stage, args, fault=run.get("fault", ""))
    if run.get("worker") and _kill_matching(proc, run["worker"], 90):
        kills.append(f"{stage}: worker process {run['worker']} SIGKILL")
    if run.get("driver"):
        end = time.monotonic() + 180
        while proc.poll() is None and not run["driver"]() and time.monotonic() < end:
            time.sleep(0.05)
        assert proc.poll() is None, f"{stage} ended before its driver could be killed ({run['why']})"
        proc.kill()
        kills.append(f"{stage}: driver SIGKILL {run['why']}")
    code = _finish(proc)
    if run.get("fault"):
        assert run["fired"](), f"{stage}: fault {run['fault']} never fired"
        if "@" not in run["fault"]:  # it killed the driver or a rank, not a task Ray retries by itself
            assert code != 0, f"{stage}: exited 0 although {run['fault']} was to stop it"
        kills.append(f"{stage}: exit at {run['fault'].split('@')[0]} ({run['where']})")
    time.sleep(1)  # a killed driver's guardian stops its local cluster
    return code


def _chaos_stage(stage: str, args: list[str], runs: list[dict], kills: list[str]) -> None:
    """Run ``stage`` once per planned run (each with its kills), then again until it exits 0."""
    for run in runs:
        _run_with_kills(stage, args, run, kills)
    for _ in range(3):
        proc = _start(stage, args)
        if _finish(proc) == 0:
            return
    raise AssertionError(f"{stage} never finished after the kills:\n{proc.stderr_text[-3000:]}")  # type: ignore


def _result(run: Path) -> dict:
    images = {}
    for path in sorted((run / "images").glob("*.done.json")):
        meta = pq.read_table(run / "images" / path.name.replace(".done.json", ".parquet"),
                             columns=["key", "code", "sha256"]).to_pylist()
        images |= {r["key"]: (r["code"], r["sha256"]) for r in meta}
    tokens = {}
    for path in sorted((run / "tokens").glob("*.done.json")):
        t = pq.read_table(run / "tokens" / path.name.replace(".done.json", ".parquet"),
                          columns=["key", "text_tokens", "image_tokens"]).to_pylist()
        tokens |= {r["key"]: (tuple(r["text_tokens"]), tuple(r["image_tokens"])) for r in t}
    prior = run / "prior"
    losses = {r["step"]: r["loss"] for r in map(json.loads, (prior / "metrics.jsonl").read_text().splitlines())}
    keys = [(prior / f"keys.rank{r}.txt").read_text().splitlines() for r in range(2)]
    return {"images": images, "tokens": tokens, "losses": losses, "keys": keys}


def test_kills_anywhere_then_reruns_equal_a_clean_run(tmp_path):
    samples = synth.make_samples(N, 0.1, seed=3)[0]
    png = {i: synth.render_png(s, 32) for i, s in enumerate(samples)}

    def slowish(i: int) -> bytes | None:
        time.sleep(0.05)  # a download that lasts long enough to be killed in the middle
        return png.get(i)

    urls = tmp_path / "urls.parquet"
    models = tmp_path / "models"
    rng = random.Random(SEED)
    kills: list[str] = []
    with ImageServer(slowish) as server:
        pd.DataFrame({"url": [server.url(i) for i in range(N)], "caption": [s.caption for s in samples]}
                     ).to_parquet(urls)
        clean, chaos = tmp_path / "clean", tmp_path / "chaos"
        for stage in ("download", "tokenize", "train-prior"):
            if stage == "tokenize" and not models.exists():  # the encoders both runs share
                make_tiny_models(load_config(REPO / "configs" / "tiny.yaml", _overrides(clean, urls, models)))
            proc = _start(stage, _overrides(clean, urls, models))
            assert _finish(proc) == 0, proc.stderr_text[-3000:]  # type: ignore[attr-defined]
        shards = N // SHARD
        images, tokens, prior = chaos / "images", chaos / "tokens", chaos / "prior"
        once = tmp_path / "fired"
        k = [rng.randrange(2, 4), rng.randrange(5, 7), rng.randrange(1, 3), rng.randrange(4, 7)]
        commit_shard = rng.randrange(0, 2)  # an early shard: its task dies between its files and its marker
        token_shard = rng.randrange(k[2] + 1, shards - 2)  # a later one: the driver dies inside its commit
        save_rank, step, step_rank = rng.randrange(2), rng.randrange(10, 15), rng.randrange(2)
        plans = {
            "download": [
                {"fault": f"shard-commit:{commit_shard}@{once}-d", "fired": (once.parent / "fired-d").exists,
                 "where": "a shard task, after its files, before its marker",
                 "driver": lambda: _committed(images) >= k[0], "why": f"after {k[0]} shards committed"},
                {"worker": "ray::download_shard", "driver": lambda: _committed(images) >= k[1],
                 "why": f"after {k[1]} shards committed"}],
            "tokenize": [
                {"worker": "Encoder", "driver": lambda: _committed(tokens) >= k[2],
                 "why": f"after {k[2]} token shards committed"},
                {"fault": f"token-commit:{token_shard}", "fired": lambda: not (tokens / f"{token_shard:05d}.done.json"
                                                                              ).exists(),
                 "where": "the encoder actor writing it, after a token shard's Parquet, before its marker"},
                {"worker": "Encoder"}],
            "train-prior": [
                {"fault": f"save:8:{save_rank}", "fired": lambda: not _checkpoint_at_least(prior, 8),
                 "where": f"rank {save_rank} inside the checkpoint save of step 8"},
                {"fault": f"step:{step}:{step_rank}", "fired": lambda: not (prior / "model.safetensors").exists(),
                 "where": f"rank {step_rank} after step {step}"},
                {"driver": lambda: _checkpoint_at_least(prior, 16), "why": "once step 16 was checkpointed"},
                {"fault": "save:24:0", "fired": lambda: not (prior / "model.safetensors").exists(),
                 "where": "rank 0 inside the last checkpoint save"}],
        }
        for stage, runs in plans.items():
            _chaos_stage(stage, _overrides(chaos, urls, models), runs, kills)
    print("\nkill points:\n  " + "\n  ".join(kills))
    assert len(kills) >= 10, kills
    a, b = _result(clean), _result(chaos)
    assert len(a["images"]) == N and b["images"] == a["images"], "images differ from the clean run"
    assert len(a["tokens"]) == sum(c == "ok" for c, _ in a["images"].values())
    assert b["tokens"] == a["tokens"], "tokens differ (lost, duplicated or changed rows)"
    assert b["keys"] == a["keys"], "the prior consumed other keys than the clean run"
    assert sorted(b["losses"]) == list(range(1, STEPS + 1))
    for step, loss in a["losses"].items():
        assert b["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step
    print(f"rows checked: {len(a['images'])} images, {len(a['tokens'])} token rows, "
          f"{sum(map(len, a['keys']))} consumed keys, {len(a['losses'])} losses; lost or duplicated: 0")
