"""What the prior's training measures: model FLOPs per sample, MFU against the device's peak, and memory.

Nothing here touches the model or the engine: ``pipeline.prior.train`` measures throughput and hands plain numbers in;
the log itself is ``pipeline.training.metrics``.
"""

from __future__ import annotations

import resource
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
