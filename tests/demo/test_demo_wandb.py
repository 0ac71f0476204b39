"""The demo's own W&B run (``logging.wandb``), offline: every stage's headline numbers as its summary and the
report's pictures as images (the trainers' runs are tested with the dVAE's, tests/dvae/test_dvae_train.py)."""

import glob

import numpy as np
import wandbfiles
from PIL import Image

from pipeline.config import load_config
from pipeline.demo.run import _track


def test_the_demo_logs_its_figures_and_pictures(tmp_path, monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "logging.wandb.project=dalle-demo",
                             "logging.wandb.mode=offline"])
    report = tmp_path / "run" / "report"
    report.mkdir(parents=True)
    for name in ("samples", "loss_curves"):
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(report / f"{name}.png")
    _track(cfg, {"download": {"wall_s": 2.0, "successes": 10, "urls": ["x"]}, "sample": {"match": 0.75}})
    (run_dir,) = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*"))
    records = wandbfiles.records(run_dir)
    summary, history = wandbfiles.summary(records), wandbfiles.history(records)
    assert summary["download/successes"] == 10 and summary["sample/match"] == 0.75
    assert summary["download/wall_s"] == 2.0 and "download/urls" not in summary  # numbers only
    assert {k for k in history[0] if k.endswith("/_type")} == {"report/samples/_type", "report/loss_curves/_type"}
