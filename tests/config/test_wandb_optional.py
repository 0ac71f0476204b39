"""W&B is optional: with ``logging.wandb`` unset nothing imports it; set without the package installed, every
trainer and the demo refuse before any work, saying how to install it; a bad mode is refused by key."""

import sys

import pytest

from pipeline import stages
from pipeline.config import ConfigError, load_config
from pipeline.training import tracking
from pipeline.training.metrics import MetricsLog


def test_unset_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now fails
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    tracker = tracking.open_run(cfg.logging.wandb, "train-prior", str(tmp_path / "prior"), str(tmp_path))
    assert tracker is None
    log = MetricsLog(str(tmp_path / "prior"), 2, tensorboard=False, tracker=tracker)
    log.log({"step": 1, "loss": 1.5})
    log.image("loss_curve", str(tmp_path / "absent.png"), 1)  # no tracker, no TensorBoard: nothing to open
    log.summary({"final_loss": 1.5})
    log.close()
    assert (tmp_path / "prior" / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("stage", ["train_dvae", "train_clip", "train_prior", "train_decoder", "demo"])
def test_set_without_the_package_says_how_to_install(tmp_path, monkeypatch, stage):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec("wandb") is None: not installed
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "logging.wandb.project=dalle"])
    if stage == "demo":
        from pipeline.demo.run import run_demo

        run = lambda: run_demo(cfg)  # noqa: E731
    else:
        run = lambda: getattr(stages, stage)(cfg)  # noqa: E731
    with pytest.raises(ConfigError, match=r"logging\.wandb\.project is 'dalle' but the wandb package is not "
                                          r"installed: pip install wandb"):
        run()
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_bad_mode_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        load_config(None, [f"run_dir={tmp_path}", "logging.wandb.mode=sometimes"])
