"""DALL-E 2's decoder on the priors' engine with real ranks: 2 CPU ranks (gloo) through the deepspeed launcher,
killed mid-run and resumed to exactly the uninterrupted run; weights without DeepSpeed; refusals before any step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from decoder_shards import EMBED, write_joined

from pipeline.decoder.checkpoints import load_decoder
from pipeline.errors import InputError
from pipeline.prior.checkpoints import export_weights, load_prior, read_weights, save_prior

REPO = Path(__file__).resolve().parents[2]
NO_IMAGE = ("000000002", "000010005")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dec")
    write_joined(root, shards=2, rows=32, size=16, no_image=NO_IMAGE, no_tokens=("000000009",))
    return root


def config(tmp: Path, data: Path, out: str, **decoder) -> Path:
    base = {"channels": 16, "channel_mult": "1,2", "num_res_blocks": 1, "attention_levels": "1", "head_channels": 16,
            "context_dim": 32, "text_len": 4, "text_layers": 1, "steps": 10, "micro_batch_size": 4,
            "warmup_steps": 2, "log_every": 1, "zero_stage": 2, "num_procs": 2, "save_every": 4,
            "keep_checkpoints": 3, "record_keys": True, "shuffle_buffer": 16, "loader_unit_rows": 8,
            "heldout_percent": 10.0, "peak_tflops": 0.05, "lr": 0.002, "output": out, "timesteps": 100}
    path = tmp / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp / "run"), "download": {"output": str(data / "images"),
                                                                             "image_size": 16},
                                    "tokenize": {"output": str(data / "tokens")}, "decoder": {**base, **decoder}}))
    return path


def launch(cfg: Path, fault: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "train-decoder", "--config", str(cfg)], cwd=REPO,
                          env={**os.environ, "PIPELINE_FAULT": fault}, capture_output=True, text=True, timeout=600)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def keys(out: Path) -> list[list[str]]:
    return [(out / f"keys.rank{r}.txt").read_text().splitlines() for r in range(2)]


@pytest.mark.slow
def test_two_ranks_train_kill_and_resume_exactly(tmp_path, data):
    ref_out, out = tmp_path / "ref", tmp_path / "decoder"
    ref = launch(config(tmp_path, data, str(ref_out)))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    log = ref.stdout + ref.stderr
    assert "[train-decoder] 61 rows joined by key; skipped: 2 token rows without an image, 1 images without a " \
           "token row" in log
    summary = json.loads([x for x in ref.stdout.splitlines() if x.startswith("{")][-1])
    assert summary["join_joined"] == 61 and summary["ranks"] == 2
    recs = rows(ref_out)
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert all(0 < r["valid"] <= 8 and r["mse"] > 0 and r["samples_per_s"] > 0 and 0 < r["mfu"] < 1 for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
    state = json.loads((ref_out / "step00000008" / "train_state.json").read_text())
    assert state["kind"] == "decoder" and state["data_plan"]["images"]["join"]["joined"] == 61
    ds = json.loads((ref_out / "step00000008" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8
    from pipeline.prior.rows import heldout_mask

    trained = {line.split("\t")[1] for r in keys(ref_out) for line in r}
    masked = [k for k in trained if heldout_mask([k], 10.0)[0] or k in NO_IMAGE]
    assert masked and sum(r["valid"] for r in recs) <= 80 - len(masked)  # passed through, never trained on

    killed = launch(config(tmp_path, data, str(out)), fault="step:6")
    assert killed.returncode != 0 and (out / "latest_complete").read_text() == "step00000004"
    done = launch(config(tmp_path, data, str(out)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[train-decoder] resumed from" in done.stdout + done.stderr
    assert keys(out) == keys(ref_out)  # the same samples, in the same order, on each rank
    ref_l, got = {r["step"]: r["loss"] for r in recs}, {r["step"]: r["loss"] for r in rows(out)}
    assert sorted(got) == list(range(1, 11)) and max(abs(got[s] - ref_l[s]) for s in ref_l) < 1e-6

    model, meta = load_decoder(str(out / "model.safetensors"))  # EMA weights, no DeepSpeed
    assert model.shape.embed_dim == EMBED and model.shape.image_size == 16 and meta["embed_dim"] == EMBED
    exported, _ = load_decoder(export_weights(str(out)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), exported.state_dict().values()))
    raw = read_weights(str(out / "model.safetensors"), "decoder")["raw_state_dict"]
    assert not torch.equal(raw["out.2.weight"], model.state_dict()["out.2.weight"])  # EMA differs from raw
    img = model.sample(torch.randn(2, EMBED), torch.zeros(2, 4, dtype=torch.long), steps=4, guidance_scale=2.0)
    assert img.shape == (2, 3, 16, 16)

    with pytest.raises(InputError, match="DALL-E 2's decoder .* not a diffusion prior"):
        load_prior(str(out / "model.safetensors"), "diffusion")
    prior = tmp_path / "prior.safetensors"
    save_prior(str(prior), "diffusion", {"text_vocab": 10, "text_len": 4, "embed_dim": 8}, {}, {}, 1)
    with pytest.raises(InputError, match="a 'diffusion' prior's weights, not a decoder's"):
        load_decoder(str(prior))

    # resuming onto another embedding width: refused naming the shape, before any step
    meta_path = out / "step00000010" / "train_state.json"
    st = json.loads(meta_path.read_text())
    st["shape"]["embed_dim"] = 32
    meta_path.write_text(json.dumps(st))
    bad = launch(config(tmp_path, data, str(out), steps=12))
    assert bad.returncode == 2 and "decoder shape ['embed_dim'] differs" in bad.stderr, bad.stderr[-2000:]
