"""The ``logging:`` section: where trainers stream their log besides ``metrics.jsonl`` and TensorBoard (each
trainer's own ``tensorboard`` key). Today: Weights & Biases, off unless ``logging.wandb.project`` is set."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.checks import check as _check

WANDB_MODES = ("", "online", "offline", "disabled")


@dataclass
class WandbConfig:
    """A W&B run per trainer start (rank 0 of train-dvae, train-clip, train-prior of either kind, train-decoder, and
    the demo's summary): the same scalars as TensorBoard, the reconstruction grids and loss curves as images. The
    wandb package is imported only when ``project`` is set; credentials come from ``wandb login`` / WANDB_API_KEY on
    the machine that trains, never from this config."""

    project: str = ""
    """W&B project to log to; empty: W&B off (wandb is never imported)."""
    entity: str = ""
    """W&B entity (user or team) owning the project; empty: the logged-in user's default."""
    name: str = ""
    """Run name; empty: '<command> <run_dir name>'. Runs are grouped by the trainer's output folder, so the runs of
    a resumed training (one per start) sit together."""
    mode: str = ""
    """online, offline (files under WANDB_DIR, `wandb sync` later) or disabled; empty: wandb's own default
    (WANDB_MODE, else online)."""

    def __post_init__(self) -> None:
        _check(self.mode in WANDB_MODES, "logging.wandb.mode", f"must be one of {', '.join(WANDB_MODES[1:])} or empty")


@dataclass
class LoggingConfig:
    """Experiment tracking beyond metrics.jsonl and TensorBoard."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases (optional; `pip install wandb`)."""
