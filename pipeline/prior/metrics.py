"""Training metrics for the prior: FLOP counts and MFU, memory, and the rank-0 log (JSON lines, TensorBoard, console).

Nothing here touches the model or the engine: ``pipeline.prior.train`` measures throughput and hands plain numbers in.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import warnings
from typing import Any

import torch

from pipeline.prior.transformer import PriorShape

METRICS_FILE = "metrics.jsonl"


def flops_per_token(n_layer: int, n_embd: int, seq_len: int, vocab_out: int, n_params_nonembedding: int | None = None,
                    training: bool = True) -> float:
    """Model FLOPs per token of a dense decoder-only transformer (Kaplan et al. 2020; PaLM appendix B; Megatron-LM).

    forward = 2·N + 4·n_layer·seq_len·d + 2·d·vocab_out, where
      * 2·N: one multiply-add per matmul weight. N is the non-embedding (block matmul) parameter count; by default
        12·n_layer·d² (per layer: qkv 3d², out-projection d², MLP 4d→ and →4d 8d²). Biases and LayerNorms are omitted.
      * 4·n_layer·seq_len·d: attention scores QKᵀ (2·seq_len·d per token per layer) and the weighted sum AV (the same).
        The causal mask is counted as full attention, as PaLM does (a fused kernel skips about half; Kaplan's
        2·n_layer·seq_len·d is that halved figure). This is PaLM's 12·L·H·Q·T training term divided by 3.
      * 2·d·vocab_out: the output head (embedding lookups cost no FLOPs).
    training = 3 × forward: the backward pass costs twice the forward (gradients w.r.t. inputs and w.r.t. weights).
    Activation recomputation (checkpointing) is NOT counted, so this measures MFU (model FLOPs utilisation), not HFU:
    a recomputing run does ~4/3 the work for the same MFU.
    """
    d = n_embd
    n = 12 * n_layer * d * d if n_params_nonembedding is None else n_params_nonembedding
    forward = 2.0 * n + 4.0 * n_layer * seq_len * d + 2.0 * d * vocab_out
    return 3.0 * forward if training else forward


def prior_flops_per_sample(shape: PriorShape, text_head: bool = False) -> float:
    """Training FLOPs of one [text | image] sample: flops_per_token × seq_len (T + N - 1 positions), image head exact.

    The image head (vocab_out = image_vocab) only runs on the N image positions, so it is counted on those rather
    than on every position (≈1% of the total at 1.3b). The text head is optional (``text_head=True`` when
    prior.text_loss_weight > 0): it reuses the text embedding (text_vocab + text_len rows) on T - 1 positions.
    Row/column/conv attention kinds are counted as dense: the masks are applied to full score matrices.
    """
    body = flops_per_token(shape.n_layer, shape.n_embd, shape.seq_len, 0) * shape.seq_len
    head = 3.0 * 2.0 * shape.n_embd * shape.image_vocab * shape.image_len
    if text_head:
        head += 3.0 * 2.0 * shape.n_embd * (shape.text_vocab + shape.text_len) * (shape.text_len - 1)
    return body + head


def flops_for(shape: Any, text_head: bool = False) -> float:
    """Training FLOPs per sample for either prior. The diffusion prior's sequence is [caption tokens ; text emb ;
    time ; noised image emb ; query] (``shape.seq_len``) and its head projects only the final query to embed_dim."""
    if hasattr(shape, "image_vocab"):
        return prior_flops_per_sample(shape, text_head)
    body = flops_per_token(shape.n_layer, shape.n_embd, shape.seq_len, 0) * shape.seq_len
    return body + 3.0 * 2.0 * shape.n_embd * shape.embed_dim


# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peak TFLOP/s of one device. NVIDIA datasheets quote "with sparsity"
# figures, twice these: H100 SXM 1979 / PCIe 1513 (H100 datasheet), H200 SXM 1979 (H200 datasheet), A100 312 dense
# (A100 datasheet), L40S 733 (L40S datasheet), A10 250 (A10 datasheet; AWS's A10G is taken at the A10's value, it
# may clock lower). Matched as substrings of torch.cuda.get_device_name(), longest key first ("H100 PCIe" wins).
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
}


def device_peak_tflops(configured: float = 0.0) -> float | None:
    """Peak TFLOP/s of one device: ``configured`` (prior.peak_tflops) if > 0, else looked up by CUDA device name."""
    if configured > 0:
        return float(configured)
    if not torch.cuda.is_available():
        return None  # CPU ranks: no meaningful tensor-core peak, so MFU is not reported
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def mfu(samples_per_s: float, flops_per_sample: float, n_devices: int, peak_tflops: float | None) -> float | None:
    """Achieved model FLOP/s over the devices' combined peak, as a fraction (0.42 = 42%); None without a peak."""
    if not peak_tflops or peak_tflops <= 0 or n_devices <= 0:
        return None
    return samples_per_s * flops_per_sample / (n_devices * peak_tflops * 1e12)


def memory_stats() -> dict[str, float]:
    """Peak memory in GB (1e9 bytes): this process's CUDA allocator (when CUDA is available) and host RSS."""
    stats: dict[str, float] = {}
    if torch.cuda.is_available():
        stats["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        stats["gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    stats["host_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    return stats


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _duration(s: float) -> str:
    s = int(s)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


_warned_no_tensorboard = False


class MetricsLog:
    """Rank-0 training log: metrics.jsonl (append; truncate_after() drops records after a step on resume),
    TensorBoard event files (torch.utils.tensorboard SummaryWriter under <out>/tensorboard, when enabled; if
    tensorboard is not importable, warn once and continue), and a console line."""

    def __init__(self, out_dir: str, total_steps: int, tensorboard: bool = True, prefix: str = "[train-prior]"):
        self.out_dir, self.total_steps, self.prefix = out_dir, total_steps, prefix
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
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
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
            self._writer = SummaryWriter(os.path.join(self.out_dir, "tensorboard"), purge_step=self._purge_step)
        return self._writer

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash must not lose logged steps
        writer = self._tb()
        if writer is not None:
            for k, v in record.items():
                if k != "step" and _is_number(v):
                    writer.add_scalar(f"train/{k}", v, step)
            writer.flush()  # default flush is every 120 s: too late for someone watching a short job
        print(self._console_line(step, record), flush=True)

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


def read_metrics(out_dir: str) -> list[dict[str, Any]]:
    """The records of <out_dir>/metrics.jsonl; blank or torn lines (a crash mid-write) are skipped."""
    path = os.path.join(out_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def plot_loss_curve(out_dir: str, path: str | None = None) -> str:
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
    ax.set_title(f"prior training loss ({len(records)} records)")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)  # a reader (report, dashboard) never sees a half-written PNG
    return path
