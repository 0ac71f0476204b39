"""Weights & Biases, optional (``logging.wandb``): a run that receives what a trainer's ``MetricsLog`` writes (the
same scalars as TensorBoard, the grids and loss curves as images), opened on rank 0 only.

Never required: with ``logging.wandb.project`` empty nothing here imports ``wandb``; set without the package
installed, ``require_wandb`` fails before any work with how to install it. Credentials stay where W&B keeps them
(``wandb login``'s netrc, or WANDB_API_KEY in the training machine's environment): nothing here reads, records or
forwards them (Ray runtime_envs carry no W&B variables).
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
from typing import Any

from pipeline.config.checks import ConfigError


def enabled(wcfg: Any) -> bool:
    return bool(wcfg is not None and wcfg.project)


def require_wandb(wcfg: Any) -> None:
    """``ConfigError`` when ``logging.wandb`` is set but the package is missing (checked on the driver before a
    trainer starts, and again on the rank that opens the run)."""
    if enabled(wcfg) and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb.project is {wcfg.project!r} but the wandb package is not installed: "
                          "pip install wandb (or leave logging.wandb.project empty)")


class WandbRun:
    """The open W&B run of one trainer start: scalars and images at a step, then ``finish``."""

    def __init__(self, run: Any):
        self._run = run

    def log(self, scalars: dict[str, float], step: int) -> None:
        if scalars:
            self._run.log(scalars, step=step)

    def image(self, tag: str, path: str, step: int) -> None:
        import wandb

        self._run.log({tag: wandb.Image(path, caption=os.path.basename(path))}, step=step)

    def summary(self, figures: dict[str, float]) -> None:
        self._run.summary.update(figures)

    def finish(self) -> None:
        self._run.finish()


def open_run(wcfg: Any, command: str, out: str, local_dir: str, config: dict[str, Any] | None = None
             ) -> WandbRun | None:
    """A W&B run for ``command`` writing to ``out`` (its group), or None when ``logging.wandb`` is off. Its files go
    under WANDB_DIR when set, else the trainer's local folder ``local_dir``. ``config`` (the resolved run config,
    which holds no secrets: it is what ``<stage>/config.yaml`` records) becomes the run's config."""
    if not enabled(wcfg):
        return None
    require_wandb(wcfg)
    import wandb

    run_name = wcfg.name or f"{command} {posixpath.basename(out.rstrip('/')) or out}"
    kwargs: dict[str, Any] = {
        "project": wcfg.project, "entity": wcfg.entity or None, "name": run_name, "group": out, "job_type": command,
        "config": config or {}, "dir": os.environ.get("WANDB_DIR") or local_dir,
        # the trainers' console lines already go to the launcher's log, where rank errors are read from
        "settings": wandb.Settings(console="off"),
    }
    if wcfg.mode:
        kwargs["mode"] = wcfg.mode
    os.makedirs(kwargs["dir"], exist_ok=True)
    try:
        return WandbRun(wandb.init(**kwargs))
    except Exception as exc:  # noqa: BLE001 - wandb raises its own error types (no login, no network, bad entity)
        raise ConfigError(f"logging.wandb: cannot start a W&B run in project {wcfg.project!r} ({type(exc).__name__}: "
                          f"{exc}); run `wandb login`, or set logging.wandb.mode=offline") from exc
