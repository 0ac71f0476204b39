"""The one trainer skeleton: the step loop of every model trained on the DeepSpeed engine (the dVAE, both priors).

A trainer supplies a ``Task`` (what one optimizer step is, what its log record says, how it checkpoints); the loop
owns the cadence: steps ``start`` to ``end``, every ``log_every`` steps (and at the end) the window's sums are
reduced over the ranks and logged on rank 0, every ``save_every`` steps (and at the end) the task saves. Resume is
the trainer's: it finds its checkpoint, loads it into the engine and hands the loop the step it reached.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.training.metrics import MetricsLog

COUNT = "micro_batches"  # every step's sums carry how many micro-batches they cover; means divide by the total


class Task(Protocol):
    def step(self, step: int) -> dict[str, float]:
        """Train step ``step`` (all its micro-batches) on this rank; sums of its figures and ``micro_batches``."""

    def record(self, done: int, means: dict[str, float], seconds: float) -> tuple[dict[str, Any], str | None]:
        """Rank 0: the metrics record after step ``done`` (from the window's means over every rank and micro-batch,
        and the window's wall seconds) and its console line (None: the log's progress line)."""

    def after_log(self, done: int) -> None:
        """After step ``done`` is logged (when it was) and before any save: e.g. a held-out evaluation."""

    def save(self, done: int) -> None:
        """Checkpoint after step ``done``, on every rank."""


@dataclass
class Cadence:
    start: int
    end: int
    log_every: int
    save_every: int  # 0: only at the end


def run(task: Task, cadence: Cadence, log: MetricsLog | None, summed: tuple[str, ...] = ()) -> None:
    """Steps ``cadence.start`` .. ``cadence.end - 1``; ``summed`` keys are logged as totals, the rest as means."""
    sums: dict[str, float] = {}
    t_window = time.time()
    for step in range(cadence.start, cadence.end):
        for k, v in task.step(step).items():
            sums[k] = sums.get(k, 0.0) + v
        done = step + 1
        if done % cadence.log_every == 0 or done == cadence.end:
            means = reduce_means(sums, summed)
            if log is not None:
                record, line = task.record(done, means, time.time() - t_window)
                log.log(record, console=line)
            sums, t_window = {}, time.time()
        task.after_log(done)
        if (cadence.save_every and done % cadence.save_every == 0) or done == cadence.end:
            task.save(done)


def reduce_means(sums: dict[str, float], summed: tuple[str, ...] = ()) -> dict[str, float]:
    """The window's sums added over every rank (every rank must call this), divided by the micro-batch count except
    for ``summed`` keys; ``micro_batches`` stays the total count."""
    names = sorted(sums)
    totals = torch.tensor([sums[k] for k in names], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    agg = dict(zip(names, totals.tolist()))
    n = agg[COUNT]
    return {k: v if k in summed or k == COUNT else v / n for k, v in agg.items()}
