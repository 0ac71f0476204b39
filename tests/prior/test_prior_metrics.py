"""FLOP counts / MFU against hand arithmetic, and the rank-0 metrics log (JSON lines, TensorBoard, console, plot)."""

import json
import os

import pytest
import torch

from pipeline.config.prior import PRIOR_SIZES
from pipeline.prior.metrics import device_peak_tflops, flops_per_token, memory_stats, mfu, prior_flops_per_sample
from pipeline.prior.transformer import DalleTransformer, PriorShape
from pipeline.training.metrics import MetricsLog, plot_loss_curve, read_metrics


def test_flops_per_token_small_by_hand():
    # n_layer 2, d 64, seq 10, vocab 100: 2·(12·2·64²) + 4·2·10·64 + 2·64·100 = 196608 + 5120 + 12800
    assert flops_per_token(2, 64, 10, 100, training=False) == 214528
    assert flops_per_token(2, 64, 10, 100) == 3 * 214528
    # An explicit non-embedding count replaces 12·L·d²: 2·1000 + 5120 + 12800
    assert flops_per_token(2, 64, 10, 100, n_params_nonembedding=1000, training=False) == 19920


def test_prior_flops_per_sample_small_by_hand():
    s = PriorShape(text_vocab=50, text_len=4, image_vocab=32, image_grid=3, n_layer=2, n_head=2, n_embd=16)
    assert s.seq_len == 12
    # body per token 3·(2·12·2·16² + 4·2·12·16) = 3·(12288 + 1536) = 41472, × 12 positions = 497664;
    # image head 3·2·16·32 on 9 image positions = 27648
    assert prior_flops_per_sample(s) == 497664 + 27648
    # text head: 3·2·16·(50 + 4) rows on 3 text positions = 15552
    assert prior_flops_per_sample(s, text_head=True) == 497664 + 27648 + 15552


def test_prior_flops_1p3b_by_hand_and_6n_sanity():
    L, H, d = PRIOR_SIZES["1.3b"]
    s = PriorShape(text_vocab=16384, text_len=256, image_vocab=8192, image_grid=32, n_layer=L, n_head=H, n_embd=d)
    assert (L, d, s.seq_len) == (24, 2048, 1279)
    # per token: 6·12·24·2048² = 7_247_757_312 (weights) + 12·24·1279·2048 = 754_384_896 (attention scores);
    # × 1279 tokens = 10_234_739_884_032, + image head 6·2048·8192·1024 = 103_079_215_104
    per_sample = prior_flops_per_sample(s)
    assert per_sample == 10_234_739_884_032 + 103_079_215_104
    # Sanity against the 6·N·tokens rule with N = all parameters (embeddings included; built on meta, no memory):
    # the rule must land within 15% below the full count, the gap being mostly the attention-score term.
    with torch.device("meta"):
        n = sum(p.numel() for p in DalleTransformer(s).parameters())
    ratio = 6 * n * s.seq_len / per_sample
    assert 0.85 < ratio < 1.0, ratio
    attention_share = 754_384_896 * s.seq_len / per_sample
    assert 0.05 < attention_share < 0.15


def test_mfu_arithmetic():
    # 100 samples/s × 1e12 FLOPs on 4 devices of 100 TFLOP/s: 1e14 / 4e14 = 25%
    assert mfu(100.0, 1e12, 4, 100.0) == pytest.approx(0.25)
    assert mfu(100.0, 1e12, 4, None) is None
    assert mfu(100.0, 1e12, 0, 100.0) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_device_peak_tflops_cpu_and_configured():
    assert device_peak_tflops() is None
    assert device_peak_tflops(123.5) == 123.5


def test_memory_stats_host_rss():
    stats = memory_stats()
    assert stats["host_peak_rss_gb"] > 0
    assert ("gpu_peak_allocated_gb" in stats) == torch.cuda.is_available()


def _rec(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "image_loss": loss + 0.1, "text_loss": None, "lr": 1e-3,
            "samples_per_s": 50.0, "tokens_per_s": 50.0 * 1279, "mfu": 0.4}


def test_metrics_log_jsonl_tensorboard_console(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path)
    log = MetricsLog(out, total_steps=10)
    for step in (2, 4, 6):
        log.log(_rec(step, 5.0 - step / 10))
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("[train-prior] step ") for line in lines)
    assert "step 4/10 [########............]  40%" in lines[1]
    assert "loss 4.6000" in lines[1] and "mfu 40.0%" in lines[1] and "eta " in lines[1]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4, 6]
    assert read_metrics(out)[0]["text_loss"] is None

    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/image_loss", "train/lr", "train/mfu", "train/tokens_per_s"} <= tags
    assert "train/text_loss" not in tags  # None is not a scalar
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6] and loss[1].value == pytest.approx(4.6)


def test_truncate_after_resume(tmp_path, capsys):
    out = str(tmp_path)
    log = MetricsLog(out, total_steps=10, tensorboard=False)
    for step in (2, 4, 6):
        log.log(_rec(step, 1.0))
    log.close()
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 8, "lo')  # a torn line from a crash mid-write
    resumed = MetricsLog(out, total_steps=10, tensorboard=False, prefix="[x]")
    resumed.truncate_after(4)  # the checkpoint resumed is step 4: steps 6 and 8 will be redone
    resumed.log(_rec(6, 0.5))
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(out)] == [(2, 1.0), (4, 1.0), (6, 0.5)]
    assert capsys.readouterr().out.splitlines()[-1].startswith("[x] step 6/10")


def test_plot_loss_curve_png(tmp_path):
    from PIL import Image

    out = str(tmp_path)
    log = MetricsLog(out, total_steps=10, tensorboard=False)
    for step in range(1, 6):
        log.log(_rec(step, 5.0 / step))
    log.close()
    path = plot_loss_curve(out)
    assert path == os.path.join(out, "loss_curve.png") and os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0
    assert not os.path.exists(path + ".tmp")


def test_truncate_after_purges_tensorboard_steps(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path)
    log = MetricsLog(out, total_steps=10)
    for step in (2, 4, 6, 8):
        log.log(_rec(step, 1.0))
    log.close()
    resumed = MetricsLog(out, total_steps=10)
    resumed.truncate_after(4)  # the writer is opened with purge_step 5: TensorBoard drops the old 6 and 8
    resumed.log(_rec(6, 0.5))
    resumed.close()
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(2, 1.0), (4, 1.0), (6, 0.5)]
