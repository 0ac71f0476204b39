"""The prior's DeepSpeed engine with real ranks: ZeRO-2/3 through the deepspeed launcher, exact kill/resume, policies.

Token shards are written directly (a caption digit decides the image codes), so these tests do not need the demo.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.prior.checkpoints import export_weights, find_resume, load_prior, read_weights
from pipeline.prior.loader import DataError, make_plan
from pipeline.runtime import ds_seam
from pipeline.storage.checkpoints import Checkpoints
from pipeline.tokenize import writer as tokenize

REPO = Path(__file__).resolve().parents[2]
GRID, IMAGE_VOCAB, TEXT_VOCAB = 4, 16, 50
META = {"grid": GRID, "embed_dim": 4, "dvae": {"vocab_size": IMAGE_VOCAB}, "clip": {"model": "test"},
        "tokenizer": {"vocab_size": TEXT_VOCAB}, "preprocess": {}, "schema_version": "1"}


def write_tokens(folder: Path, shards: int = 3, rows: int = 40, grid: int = GRID) -> None:
    rng = np.random.default_rng(0)
    for s in range(shards):
        digits = rng.integers(0, 8, rows)
        image = (digits[:, None] + np.arange(grid * grid)[None, :] // 4) % IMAGE_VOCAB  # caption decides the codes
        text = [[int(d) + 1, 20 + int(d)] for d in digits]
        emb = rng.standard_normal((rows, 4)).astype(np.float32)
        if s == 0:  # unusable CLIP embeddings: the diffusion prior must count and skip them, never train on them
            emb[3] = np.nan
            emb[5] = 0.0
        tokenize.write_token_shard(str(folder), s, {
            "key": [f"{s:05d}{i:04d}" for i in range(rows)], "url": [""] * rows, "caption": [str(d) for d in digits],
            "sha256": [""] * rows, "width": [8] * rows, "height": [8] * rows, "text_tokens": text,
            "image_tokens": image, "clip_image_emb": emb, "clip_text_emb": emb,
            "clip_similarity": np.zeros(rows, np.float32)}, dict(META, grid=grid))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "tokens"
    write_tokens(folder)
    return folder


def config(tmp_path: Path, tokens: Path, out: str, **prior) -> Path:
    base = {"n_layer": 2, "n_head": 2, "n_embd": 32, "text_len": 4, "steps": 12, "micro_batch_size": 8,
            "warmup_steps": 2, "log_every": 1, "zero_stage": 2, "num_procs": 2, "save_every": 4,
            "keep_checkpoints": 3, "record_keys": True, "text_loss_weight": 0.125, "caption_dropout": 0.2,
            "shuffle_buffer": 32, "loader_unit_rows": 8, "peak_tflops": 0.05, "lr": 0.003, "output": out}
    path = tmp_path / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "tokenize": {"output": str(tokens)},
                                    "prior": {**base, **prior}}))
    return path


def launch(cfg: Path, fault: str = "", entry: str = "stage") -> subprocess.CompletedProcess:
    env = {**os.environ, "PIPELINE_FAULT": fault}
    if entry == "stage":
        cmd = [sys.executable, "-m", "pipeline", "train-prior", "--config", str(cfg)]
    else:  # the deepspeed launcher straight on the job script, as `deepspeed --hostfile H jobs/train_prior.py`
        env["DS_ACCELERATOR"] = "cpu"
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29731",
               "jobs/train_prior.py", "--config", str(cfg)]
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        ds_seam._remove_shm_buffers(29731)  # the launcher run by hand here: free DeepSpeed's /dev/shm buffers too


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def keys(out: Path) -> list[list[str]]:
    return [(out / f"keys.rank{r}.txt").read_text().splitlines() for r in range(2)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokens):
    tmp = tmp_path_factory.mktemp("ref")
    proc = launch(config(tmp, tokens, str(tmp / "prior")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "prior"


@pytest.mark.slow
def test_zero2_trains_and_logs_everything(reference):
    rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.8
    for r in rows:  # text and image losses apart, throughput, MFU from the configured peak, memory
        assert r["text_loss"] > 0 and r["image_loss"] > 0 and r["tokens_per_s"] > r["samples_per_s"] > 0
        assert 0 < r["mfu"] < 1 and r["host_peak_rss_gb"] > 0
        assert r["loss"] == pytest.approx(0.875 * r["image_loss"] + 0.125 * r["text_loss"], rel=1e-5)
    assert list((reference / "tensorboard").iterdir()) and (reference / "loss_curve.png").stat().st_size > 0
    ds = json.loads((reference / "step00000012" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 16
    state = json.loads((reference / "step00000012" / "train_state.json").read_text())
    assert state["step"] == 12 and state["data_plan"]["shards"] and state["shape"]["image_grid"] == GRID
    assert Checkpoints(str(reference)).tags() == ["step00000004", "step00000008", "step00000012"]
    per_rank = keys(reference)
    assert all(len(k) == 12 * 8 for k in per_rank)
    for step in range(12):  # the ranks never train on the same sample in a step
        a = {x.split("\t")[1] for x in per_rank[0] if x.startswith(f"{step}\t")}
        b = {x.split("\t")[1] for x in per_rank[1] if x.startswith(f"{step}\t")}
        assert len(a) == len(b) == 8 and not a & b


@pytest.mark.slow
def test_kill_mid_training_and_during_save_then_resume_exactly(tmp_path, tokens, reference):
    out = tmp_path / "prior"
    cfg = config(tmp_path, tokens, str(out))
    killed = launch(cfg, fault="step:6")  # a rank dies after step 6; the last complete checkpoint is step 4
    assert killed.returncode != 0 and "exits hard at step:6" in killed.stdout + killed.stderr
    assert (out / "latest_complete").read_text() == "step00000004"
    torn = launch(cfg, fault="save:8:1")  # resumes at 4, then rank 1 dies while checkpoint 8 is being written
    assert torn.returncode != 0 and "resumed from" in torn.stdout + torn.stderr
    assert (out / "latest_complete").read_text() == "step00000004"
    assert (out / "step00000008").exists() and not (out / "step00000008" / "complete.json").exists()
    done = launch(cfg)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "removing" in log and "step00000008: an interrupted save" in log and "at step 4" in log
    assert keys(out) == keys(reference)  # the same samples, in the same order, on each rank
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, 13))  # each step logged once despite being trained twice
    assert max(abs(got[s] - ref[s]) for s in ref) < 1e-6


@pytest.mark.slow
def test_resume_with_gradient_accumulation_continues_at_the_right_micro_batch(tmp_path, tokens):
    """gradient_accumulation_steps=2: an optimizer step consumes two micro-batches, so a resume at step 4 must read
    from micro-batch 8. Killed at step 6, resumed: the same keys per step and the same losses as a run never
    interrupted (one rank: what is under test is the data position, not the ranks)."""
    gas = {"gradient_accumulation_steps": 2, "num_procs": 1, "steps": 8, "save_every": 4, "micro_batch_size": 4}
    ref_out, out = tmp_path / "ref", tmp_path / "prior"
    ref = launch(config(tmp_path, tokens, str(ref_out), **gas))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    ref_keys = (ref_out / "keys.rank0.txt").read_text().splitlines()
    assert [sum(1 for k in ref_keys if k.startswith(f"{s}\t")) for s in range(8)] == [2 * 4] * 8
    assert len({k.split("\t")[1] for k in ref_keys}) == 64  # 8 steps × 2 × 4 rows, all of one 120-row epoch
    ds = json.loads((ref_out / "step00000008" / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 8
    killed = launch(config(tmp_path, tokens, str(out), **gas), fault="step:6")
    assert killed.returncode != 0 and (out / "latest_complete").read_text() == "step00000004"
    done = launch(config(tmp_path, tokens, str(out), **gas))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "at step 4" in done.stdout + done.stderr
    assert (out / "keys.rank0.txt").read_text().splitlines() == ref_keys
    ref_l, got = losses(ref_out), losses(out)
    assert sorted(got) == list(range(1, 9)) and max(abs(got[s] - ref_l[s]) for s in ref_l) < 1e-6


@pytest.mark.slow
def test_zero3_through_deepspeed_launcher_on_the_job_script(tmp_path, tokens):
    out = tmp_path / "prior"
    proc = launch(config(tmp_path, tokens, str(out), zero_stage=3, save_every=0, record_keys=False, steps=16),
                  entry="deepspeed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = losses(out)
    assert got[16] < got[1] * 0.85
    assert json.loads((out / "step00000016" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3

    model, meta = load_prior(str(out / "model.safetensors"), "ar")  # weights gathered from the ZeRO-3 shards
    assert meta["grid"] == GRID and sum(p.numel() for p in model.parameters()) > 10_000
    exported, _ = load_prior(export_weights(str(out)), "ar")  # offline, from the sharded checkpoint on disk
    for (name, a), b in zip(model.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
    from pipeline.prior.transformer import pad_text  # sampling on one process from what two ZeRO-3 ranks saved

    codes = exported.generate(pad_text([[1, 20]], 4, TEXT_VOCAB), top_k=4, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (1, GRID * GRID) and int(codes.max()) < IMAGE_VOCAB


@pytest.mark.slow
def test_export_of_any_checkpoint_without_deepspeed_ranks(reference):

    final, _ = load_prior(str(reference / "model.safetensors"), "ar")
    last, _ = load_prior(export_weights(str(reference)), "ar")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), last.state_dict().values()))
    earlier, meta = load_prior(export_weights(str(reference), "step00000008"), "ar")
    assert meta["grid"] == GRID and not torch.equal(earlier.image_head.weight, final.image_head.weight)


def test_resume_policies_refuse_clearly(tmp_path, tokens):
    out = tmp_path / "prior"
    assert find_resume(str(out), "auto") is None
    with pytest.raises(ds_seam.CheckpointError, match="no complete checkpoint to resume and prior.resume=require"):
        find_resume(str(out), "require")
    (out / "step00000004").mkdir(parents=True)
    (out / "step00000004" / "complete.json").write_text("{}")
    with pytest.raises(ds_seam.CheckpointError, match="latest_complete pointer is missing; refusing to start"):
        find_resume(str(out), "auto")
    (out / "latest_complete").write_text("step00000004")
    with pytest.raises(ds_seam.CheckpointError, match="prior.resume=never"):
        find_resume(str(out), "never")
    with pytest.raises(ds_seam.CheckpointError, match="train_state.json: unreadable"):
        find_resume(str(out), "auto")


def test_resume_onto_data_of_another_grid_is_refused(tmp_path, tokens):
    other = tmp_path / "tokens8"
    write_tokens(other, shards=1, grid=8)
    out = tmp_path / "prior"
    (out / "step00000004").mkdir(parents=True)
    (out / "step00000004" / "complete.json").write_text("{}")
    (out / "latest_complete").write_text("step00000004")
    cfg = load_config(config(tmp_path, tokens, str(out)))
    plan = make_plan(str(other), 8)
    shape = {"text_vocab": TEXT_VOCAB, "text_len": 4, "image_vocab": IMAGE_VOCAB, "image_grid": GRID, "n_layer": 2,
             "n_head": 2, "n_embd": 32, "dropout": 0.0, "attention": [], "conv_kernel": 11}
    (out / "step00000004" / "train_state.json").write_text(json.dumps({"step": 4, "shape": shape,
                                                                       "data_plan": plan.to_json()}))
    from pipeline.prior.train import train

    with pytest.raises(DataError, match="model shape \\['image_grid'\\] differs"):
        train(cfg, 0, 1)


@pytest.mark.slow
def test_diffusion_prior_trains_on_two_ranks_and_resumes_exactly(tmp_path, tokens):
    """prior.kind=diffusion on the same engine, loader and checkpoints: killed at step 6, resumed, equal to a run
    that was never interrupted; held-out and unusable rows are never trained on."""
    diff = {"kind": "diffusion", "steps": 10, "save_every": 4, "heldout_percent": 10.0, "caption_dropout": 0.2,
            "text_loss_weight": 0.0}
    ref_out, out = tmp_path / "ref", tmp_path / "prior"
    ref = launch(config(tmp_path, tokens, str(ref_out), **diff))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    rows = [json.loads(x) for x in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and all(0 < r["valid"] <= 16 for r in rows)
    assert max(r["unusable_rows_read"] for r in rows) >= 1  # the NaN / zero rows were seen, and masked
    assert 0 <= rows[-1]["cos"] <= 1 and rows[-1]["mfu"] > 0
    from pipeline.prior.eval import heldout_mask

    trained = {line.split("\t")[1] for r in range(2) for line in (ref_out / f"keys.rank{r}.txt").read_text().split(
        "\n") if line}
    held = [k for k in trained if heldout_mask([k], 10.0)[0]]
    assert held  # held-out rows pass through the loader (the order stays fixed) but are masked out of the loss
    killed = launch(config(tmp_path, tokens, str(out), **diff), fault="step:6")
    assert killed.returncode != 0 and (out / "latest_complete").read_text() == "step00000004"
    done = launch(config(tmp_path, tokens, str(out), **diff))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert keys(out) == keys(ref_out)
    ref_l, got = losses(ref_out), losses(out)
    assert max(abs(got[s] - ref_l[s]) for s in ref_l) < 1e-6

    model, meta = load_prior(str(out / "model.safetensors"), "diffusion")  # EMA weights, loadable without DeepSpeed
    exported, _ = load_prior(export_weights(str(out)), "diffusion")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), exported.state_dict().values()))
    raw = read_weights(str(out / "model.safetensors"), "diffusion")["raw_state_dict"]
    assert not torch.equal(raw["out_proj.weight"], model.state_dict()["out_proj.weight"])  # EMA differs from raw


@pytest.mark.slow
def test_an_error_inside_the_ranks_reaches_the_user_as_one_line(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "run" / "tokens").mkdir(parents=True)  # no committed token shards: every rank refuses at once
    code = main(["train-prior", "--config", str(REPO / "configs" / "tiny.yaml"), f"run_dir={tmp_path / 'run'}",
                 "prior.num_procs=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    line = [e for e in err if e.startswith("error: ")]
    assert len(line) == 1 and "no committed token shards" in line[0] and line[0].startswith("error: rank ")
    assert "Traceback" not in "\n".join(err)


def test_ray_train_errors_are_unwrapped_to_the_user_error():
    from pipeline.errors import DataError
    from pipeline.runtime.ray_seam import user_error

    inner = DataError("tokens/00000.parquet: not a token shard")
    outer = RuntimeError("Training failed")
    outer.__cause__ = type("RayTaskError", (Exception,), {})("worker died")
    outer.__cause__.cause = inner
    assert user_error(outer) is inner and user_error(RuntimeError("plain")) is None
