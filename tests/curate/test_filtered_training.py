"""A filtered prior run on the real engine (deepspeed launcher, CPU): it trains only on the rows its filter keeps,
records kept/dropped per clause, resumes after a kill with the same keys and losses as an uninterrupted run, and
refuses a resume under another filter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.tokenize import writer

REPO = Path(__file__).resolve().parents[2]
META = {"grid": 4, "embed_dim": 4, "dvae": {"vocab_size": 16}, "clip": {"model": "test"},
        "tokenizer": {"vocab_size": 50}, "preprocess": {}, "schema_version": "1",
        "extra_columns": {"punsafe": "double"}}
FILTER = "punsafe < 0.5 and width >= 16"


def kept(i: int) -> bool:
    return i % 5 != 0 and (i % 10) / 10 < 0.5 and 8 * (i % 4) >= 16  # punsafe null when i % 5 == 0


def write_tokens(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for s in range(3):
        n = 60
        digits = rng.integers(0, 8, n)
        emb = rng.standard_normal((n, 4)).astype(np.float32)
        writer.write_token_shard(str(folder), s, {
            "key": [f"{s:05d}{i:04d}" for i in range(n)], "url": [""] * n, "caption": [str(d) for d in digits],
            "sha256": [""] * n, "width": [8 * (i % 4) for i in range(n)], "height": [8] * n,
            "text_tokens": [[int(d) + 1, 20 + int(d)] for d in digits],
            "image_tokens": (digits[:, None] + np.arange(16)[None, :] // 4) % 16, "clip_image_emb": emb,
            "clip_text_emb": emb, "clip_similarity": np.zeros(n, np.float32),
            "punsafe": np.asarray([None if i % 5 == 0 else (i % 10) / 10 for i in range(n)], dtype=object)}, META)


def config(tmp: Path, tokens: Path, out: Path, filter: str = FILTER) -> Path:
    prior = {"n_layer": 2, "n_head": 2, "n_embd": 32, "text_len": 4, "steps": 8, "micro_batch_size": 4,
             "warmup_steps": 2, "log_every": 1, "zero_stage": 2, "num_procs": 1, "save_every": 4,
             "keep_checkpoints": 3, "record_keys": True, "shuffle_buffer": 16, "loader_unit_rows": 8,
             "lr": 0.003, "output": str(out), "filter": filter}
    path = tmp / f"{out.name}-{abs(hash(filter)) % 1000}.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp / "run"), "tokenize": {"output": str(tokens)},
                                    "prior": prior}))
    return path


def launch(cfg: Path, fault: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "train-prior", "--config", str(cfg)], cwd=REPO,
                          env={**os.environ, "PIPELINE_FAULT": fault}, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_filtered_run_trains_on_kept_rows_and_resumes_exactly(tmp_path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens)
    ref_out, out = tmp_path / "ref", tmp_path / "prior"
    ref = launch(config(tmp_path, tokens, ref_out))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    want = {f"{s:05d}{i:04d}" for s in range(3) for i in range(60) if kept(i)}
    ref_keys = (ref_out / "keys.rank0.txt").read_text().splitlines()
    assert len(ref_keys) == 8 * 4 and {k.split("\t")[1] for k in ref_keys} <= want
    record = json.loads((ref_out / "data_filter.json").read_text())
    c = record["counts"]
    assert record["filter"] == FILTER and c["rows"] == 180 and c["kept"] == len(want)
    assert c["dropped"] == 180 - c["kept"]
    assert [x["clause"] for x in c["clauses"]] == ["(punsafe < 0.5)", "(width >= 16)"]
    assert c["clauses"][1]["dropped"] == 90 and "filter 'punsafe < 0.5 and width >= 16'" in ref.stdout + ref.stderr
    state = json.loads((ref_out / "step00000008" / "train_state.json").read_text())
    assert state["data_plan"]["selection"]["counts"] == c

    killed = launch(config(tmp_path, tokens, out), fault="step:6")
    assert killed.returncode != 0 and (out / "latest_complete").read_text() == "step00000004"
    other = launch(config(tmp_path, tokens, out, filter="width >= 16"))  # another filter: refused, nothing trained
    assert other.returncode == 2 and "made with prior.filter='punsafe < 0.5 and width >= 16'" in other.stderr
    assert (out / "latest_complete").read_text() == "step00000004"
    done = launch(config(tmp_path, tokens, out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "at step 4" in done.stdout + done.stderr
    assert (out / "keys.rank0.txt").read_text().splitlines() == ref_keys
    ref_l, got = losses(ref_out), losses(out)
    assert sorted(got) == list(range(1, 9)) and max(abs(got[s] - ref_l[s]) for s in ref_l) < 1e-6
