"""The one training log of every trainer, written on rank 0: ``metrics.jsonl`` (the one reader is ``read_metrics``),
TensorBoard scalars and images, a W&B run when ``logging.wandb`` is set (``pipeline.training.tracking``), a console
line, and the loss-curve PNG.

Nothing here touches a model or an engine: trainers hand in plain records ``{"step": N, ...numbers}``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any

from pipeline.errors import NotFoundError
from pipeline.storage.commit import atomic_output
from pipeline.storage.urls import join, read_bytes

METRICS_FILE = "metrics.jsonl"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _duration(s: float) -> str:
    s = int(s)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


_warned_no_tensorboard = False


class MetricsLog:
    """Rank-0 training log: metrics.jsonl (append; truncate_after() drops records after a step on resume),
    TensorBoard event files (a SummaryWriter under ``<out>/<tb_dir>``, when enabled; if tensorboard is not
    importable, warn once and continue), the same scalars and images to ``tracker`` (a W&B run, or None), and a
    console line (``console`` given to ``log``, else a progress bar)."""

    def __init__(self, out_dir: str, total_steps: int, tensorboard: bool = True, prefix: str = "[train-prior]",
                 tb_dir: str = "tensorboard", tracker: Any = None):
        self.out_dir, self.total_steps, self.prefix, self.tb_dir = out_dir, total_steps, prefix, tb_dir
        self.tracker = tracker
        self.path = os.path.join(out_dir, METRICS_FILE)
        os.makedirs(out_dir, exist_ok=True)
        self._file = open(self.path, "a")
        self._tensorboard = tensorboard
        self._writer: Any = None  # opened on first log, so a truncate_after() before it can set purge_step
        self._purge_step: int | None = None
        self._t0: tuple[int, float] | None = None  # (step, time) of the first log: the ETA's rate baseline

    def truncate_after(self, step: int) -> None:
        """Keep only records with record["step"] <= step (atomic rewrite): a resumed run must not double-log steps."""
        self._file.close()
        kept = [r for r in read_metrics(self.out_dir) if r.get("step", math.inf) <= step]
        with atomic_output(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")
        # TensorBoard hides events at steps >= purge_step written by earlier runs into the same folder.
        self._purge_step = step + 1
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _tb(self) -> Any:
        global _warned_no_tensorboard
        if self._writer is None and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # ImportError, or a broken protobuf: metrics still go to the JSON lines
                if not _warned_no_tensorboard:
                    warnings.warn(f"tensorboard unavailable ({e}); logging to {METRICS_FILE} only", stacklevel=2)
                    _warned_no_tensorboard = True
                self._tensorboard = False
                return None
            self._writer = SummaryWriter(os.path.join(self.out_dir, self.tb_dir), purge_step=self._purge_step)
        return self._writer

    def log(self, record: dict[str, Any], section: str = "train", console: str | None = None) -> None:
        """Append ``record``; its numbers become TensorBoard scalars ``<section>/<key>``; print ``console`` (default:
        a progress line with loss, lr, samples/s, MFU and ETA)."""
        step = int(record["step"])
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash must not lose logged steps
        scalars = {f"{section}/{k}": v for k, v in record.items() if k != "step" and _is_number(v)}
        writer = self._tb()
        if writer is not None:
            for tag, v in scalars.items():
                writer.add_scalar(tag, v, step)
            writer.flush()  # default flush is every 120 s: too late for someone watching a short job
        if self.tracker is not None:
            self.tracker.log(scalars, step)
        print(self._console_line(step, record) if console is None else console, flush=True)

    def image(self, tag: str, path: str, step: int) -> None:
        """A PNG (e.g. a reconstruction grid, the loss curve) as a TensorBoard and W&B image."""
        if self.tracker is not None:
            self.tracker.image(tag, path, step)
        writer = self._tb()
        if writer is not None:
            import numpy as np
            from PIL import Image

            writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            writer.flush()

    def summary(self, figures: dict[str, Any]) -> None:
        """A trainer's final figures (its numbers) as the W&B run's summary; metrics.json holds them all."""
        if self.tracker is not None:
            self.tracker.summary({k: v for k, v in figures.items() if _is_number(v)})

    def _console_line(self, step: int, r: dict[str, Any]) -> str:
        total = max(self.total_steps, 1)
        frac = min(max(step / total, 0.0), 1.0)
        bar = "#" * int(frac * 20)
        parts = [f"{self.prefix} step {step}/{self.total_steps} [{bar:.<20}] {int(frac * 100):3d}%"]
        if _is_number(r.get("loss")):
            parts.append(f"loss {r['loss']:.4f}")
        if _is_number(r.get("lr")):
            parts.append(f"lr {r['lr']:.2e}")
        if _is_number(r.get("samples_per_s")):
            parts.append(f"samples/s {r['samples_per_s']:.1f}")
        if _is_number(r.get("mfu")):
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        now = time.monotonic()
        if self._t0 is None or step <= self._t0[0]:
            self._t0 = self._t0 or (step, now)  # after a resume the rate is measured from the first logged step
            parts.append("eta ?")
        else:
            rate = (step - self._t0[0]) / max(now - self._t0[1], 1e-9)
            parts.append(f"eta {_duration(max(self.total_steps - step, 0) / rate)}")
        return " ".join(parts)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def read_metrics(out_dir: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of <out_dir>/metrics.jsonl (only those whose ``kind`` is ``kind``, when given); blank or torn
    lines (a crash mid-write) are skipped."""
    try:  # a local folder or the run's storage (a URL)
        text = read_bytes(join(out_dir, METRICS_FILE)).decode(errors="replace")
    except NotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and (kind is None or rec.get("kind") == kind):
            records.append(rec)
    return records


def plot_loss_curve(out_dir: str, path: str | None = None, title: str = "prior training loss") -> str:
    """loss (and image_loss / text_loss when present) against step from metrics.jsonl, as a PNG; returns its path."""
    # Figure + the Agg canvas directly rather than pyplot: no global backend switch, no display needed, and safe to
    # call from a process that already imported pyplot with another backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = path or os.path.join(out_dir, "loss_curve.png")
    records = read_metrics(out_dir)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in ("loss", "image_loss", "text_loss"):
        pts = [(r["step"], r[key]) for r in records if _is_number(r.get(key)) and _is_number(r.get("step"))]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"{title} ({len(records)} records)")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    with atomic_output(path) as f:  # a reader (report, dashboard) never sees a half-written PNG
        fig.savefig(f, format="png")
    return path
