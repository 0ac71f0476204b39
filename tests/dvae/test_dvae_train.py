"""dVAE training on the DeepSpeed engine, streaming committed image shards: quality (one rank, in process) and an exact
resume on 2 CPU ranks started by the deepspeed launcher."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import torch
import wandbfiles

from pipeline import stages
from pipeline.config import load_config
from pipeline.demo import synth
from pipeline.dvae import train as td
from pipeline.dvae.model import load_dvae
from pipeline.errors import InputError, RunMismatchError
from pipeline.storage import commit

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def write_image_shards(folder: str, n: int, size: int, shard_size: int) -> None:
    """Committed webdataset shards as the download stage leaves them: key.png/.txt/.json members, marker last."""
    samples, _ = synth.make_samples(n, 0.1, seed=0)
    os.makedirs(folder, exist_ok=True)
    fs, path = commit.fs_and_path(folder)
    for sid, start in enumerate(range(0, n, shard_size)):
        chunk = samples[start: start + shard_size]
        with tarfile.open(f"{path}/{sid:05d}.tar", "w") as tar:
            for s in chunk:
                key = f"{sid:05d}{s.index:04d}"
                for ext, data in (("png", synth.render_png(s, size)), ("txt", s.caption.encode()),
                                  ("json", json.dumps({"key": key, "caption": s.caption}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        commit.write_marker(fs, path, sid, {"shard_id": sid, "count": len(chunk), "successes": len(chunk)})


def test_tiny_dvae_beats_constant_image_baseline(tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_image_shards(str(images), 60, 16, 20)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one rank, one thread: fast even when the cores are busy
    args = ["--config", TINY, f"run_dir={tmp_path}", "dvae.num_procs=1", "dvae.steps=400", "dvae.lr=0.006",
            "dvae.kl_weight=0.05", "dvae.kl_warmup_steps=100", "dvae.heldout_images=12", "dvae.log_every=20",
            "dvae.grid_every=200", "dvae.save_every=200"]
    result = td.main(args)
    out = tmp_path / "dvae"
    assert result["heldout_images"] == 12 and result["train_images"] == 48 and result["grid"] == 8
    # Hard codes (encode → decode, what tokenize + sample give) of images never trained on.
    # (about 0.025 against 0.054 for the best constant image and 0.032 for each image's own mean colour)
    assert result["heldout_mse"] < 0.6 * result["constant_baseline_mse"], result
    assert result["heldout_mse"] < 0.9 * result["flat_colour_baseline_mse"], result
    assert result["heldout_psnr"] > 14 and result["codes_used"] >= 4 and result["perplexity"] > 2, result
    assert result["perplexity"] <= result["codes_used"]  # exp(entropy) never exceeds the codes in use
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["result"] == result and [e["step"] for e in doc["evals"]] == [200, 400]
    losses = [h["loss"] for h in doc["history"]]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5
    for step in (200, 400):
        assert (out / f"recon_step{step:06d}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "latest_complete").read_text() == "step00000400"
    model = load_dvae(str(out / "dvae.safetensors"))  # the file tokenize and sample load, without DeepSpeed
    x = torch.rand(2, 3, 16, 16)
    assert model.encode(x).shape == (2, 8, 8) and torch.equal(model.encode(x), model.encode(x))
    assert td.main(args) == result  # rerun: already trained, nothing to do
    # An earlier version's dvae.pt in its place: refused saying to rerun train-dvae, which then re-exports the weights
    # from the newest complete checkpoint without training further (the history stays the 20 logged steps).
    before = model.state_dict()
    (out / "dvae.safetensors").unlink()
    (out / "dvae.json").unlink()
    torch.save({"kind": "dvae", "state_dict": before}, out / "dvae.pt")
    with pytest.raises(InputError, match=r"dvae\.pt: a torch pickle .* rerun `python -m pipeline train-dvae`"):
        load_dvae(str(out / "dvae.safetensors"))
    assert td.main(args)["steps"] == 400
    again = load_dvae(str(out / "dvae.safetensors")).state_dict()
    assert all(torch.equal(again[k], v) for k, v in before.items())
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 20
    with pytest.raises(RunMismatchError, match=r"different settings; refusing to resume .*shape\..*dvae.resume=false"):
        td.main([*args, "dvae.steps=500", "dvae.n_hid=16"])  # a different model cannot resume these weights


def test_two_ranks_resume_gives_the_uninterrupted_losses(tmp_path):
    images = tmp_path / "images"
    write_image_shards(str(images), 48, 16, 16)  # 3 shards: the 2 ranks read disjoint shards each epoch
    steps = 8
    common = [f"download.output={images}", "dvae.num_procs=2", f"dvae.steps={steps}", "dvae.batch_size=8",
              "dvae.log_every=1", "dvae.heldout_images=4", "dvae.grid_every=4", "dvae.window_shards=1",
              "dvae.kl_warmup_steps=4", "dvae.input_noise=0.05", "dvae.zero_stage=1"]
    whole = load_config(TINY, [f"run_dir={tmp_path / 'whole'}", *common])
    part = load_config(TINY, [f"run_dir={tmp_path / 'part'}", *common, "dvae.stop_after_steps=4"])
    rest = load_config(TINY, [f"run_dir={tmp_path / 'part'}", *common])

    a = stages.train_dvae(whole)
    stopped = stages.train_dvae(part)
    assert stopped["stopped_after_step"] == 4 and stopped["checkpoint"] == "step00000004"
    assert not (tmp_path / "part" / "dvae" / "dvae.safetensors").exists()
    b = stages.train_dvae(rest)
    assert "resumed from" in (tmp_path / "part" / "dvae" / "launcher.log").read_text()

    def train_log(run):
        rows = [json.loads(x) for x in (tmp_path / run / "dvae" / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["recon_mse"], r["kl"]) for r in rows if r["kind"] == "train"]

    whole_log, part_log = train_log("whole"), train_log("part")
    assert [s for s, *_ in whole_log] == [s for s, *_ in part_log] == list(range(1, steps + 1))
    for (step, *x), (_, *y) in zip(whole_log, part_log):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-9), step
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-6)
    wa = load_dvae(str(tmp_path / "whole" / "dvae" / "dvae.safetensors")).state_dict()
    wb = load_dvae(str(tmp_path / "part" / "dvae" / "dvae.safetensors")).state_dict()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), k
    assert b["heldout_mse"] == pytest.approx(a["heldout_mse"], rel=1e-5)
    assert a["ranks"] == 2 and a["train_images"] == 44


def test_an_offline_wandb_run_gets_the_same_scalars_and_the_grids(tmp_path, monkeypatch, capsys):
    """logging.wandb set: rank 0 streams every metrics.jsonl number (what TensorBoard gets) and the reconstruction
    grid to a W&B run, here offline (no network), with the run's final figures as its summary."""
    import glob

    write_image_shards(str(tmp_path / "images"), 24, 16, 12)
    secret = "k" * 40  # a credential in the environment never reaches the run's files
    for k, v in {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"),
                 "WANDB_SILENT": "true", "WANDB_API_KEY": secret}.items():
        monkeypatch.setenv(k, v)
    result = td.main(["--config", TINY, f"run_dir={tmp_path}", "dvae.num_procs=1", "dvae.steps=6", "dvae.log_every=2",
                      "dvae.heldout_images=4", "dvae.grid_every=6", "dvae.save_every=6",
                      "logging.wandb.project=dalle-pipeline-test", "logging.wandb.mode=offline"])
    (run_dir,) = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*"))
    records = wandbfiles.records(run_dir)
    history = wandbfiles.history(records)
    logged = [json.loads(x) for x in (tmp_path / "dvae" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == sorted({r["step"] for r in logged}) == [2, 4, 6]
    for r in logged:  # every number of every record, under <section>/<key> as TensorBoard names it
        want = {f"{r['kind']}/{k}": v for k, v in r.items() if k not in ("step", "kind") and isinstance(v, float | int)}
        assert want and all(history[r["step"]][k] == pytest.approx(v) for k, v in want.items()), (r, history)
    image = history[6]  # the held-out reconstruction grid, a media file of the run
    assert image["recon/_type"] == "image-file" and os.path.isfile(os.path.join(run_dir, "files", image["recon/path"]))
    summary = wandbfiles.summary(records)
    assert summary["heldout_mse"] == pytest.approx(result["heldout_mse"])
    keys = {k.removesuffix("/_type") for row in history.values() for k in row
            if not k.startswith("_") and (k.endswith("/_type") or "/" in k and k.split("/")[0] in ("train", "eval"))}
    print("W&B offline run keys:", sorted(keys), "steps:", sorted(history))
    files = [p for p in glob.glob(os.path.join(run_dir, "**"), recursive=True) if os.path.isfile(p)]
    assert files and not any(secret.encode() in open(p, "rb").read() for p in files)
