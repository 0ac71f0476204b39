"""DALL-E 2's decoder: the training step through the project's engine against a bare PyTorch loop, and sampling speed.

    python benchmarks/bench_decoder.py [--size 32] [--channels 32] [--micro 16] [--pairs 5] [--run-s 20]

1. Engine overhead (the headline): our training step, ``DecoderTask.step`` as a one-rank run builds it (the joined
   loader reading committed image + token shards and decoding PNGs, guidance dropout, the DeepSpeed engine's
   AdamW / warm-up-cosine / clipping, the EMA update) vs a bare PyTorch loop on the same U-Net from the same weights
   (in-memory tensors, torch AdamW with the same hyper-parameters, clipping, schedule and EMA). Runs alternate A/B,
   the order flipped each pair, each run at least ``--run-s`` seconds (``_results.alternate``); the ratio is taken per
   pair and the headline is the median over the pairs, min and max beside it. Goal <= 1.1x.
2. DDIM sampling on the CPU: images/s at 50 steps with classifier-free guidance 3 (two forwards per step), runs of at
   least ``--run-s`` seconds.
3. On a GPU (only when CUDA is present): the 1b decoder (1.13 B parameters, 64x64, ViT-L/14's 768-d embeddings, 77
   caption tokens) in bf16 through the same engine: training samples/s and MFU; and its DDIM images/s.

The machine's load at the start is recorded and a busy machine flagged. Writes benchmarks/results/decoder.json and
prints it as the last line.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tarfile
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from _results import MIN_PAIRS, MIN_RUN_S, alternate, headline, machine_state, write_result  # noqa: E402
from bench_train import init_single_rank  # noqa: E402 - the one-rank process group bench_train sets up

from pipeline.config import Config, DecoderConfig  # noqa: E402
from pipeline.decoder.checkpoints import decoder_shape  # noqa: E402
from pipeline.decoder.data import make_decoder_plan  # noqa: E402
from pipeline.decoder.model import Decoder, forward_flops  # noqa: E402
from pipeline.decoder.train import DecoderObjective, DecoderTask  # noqa: E402
from pipeline.demo import synth  # noqa: E402
from pipeline.prior import metrics as prior_metrics  # noqa: E402
from pipeline.runtime import ds_seam  # noqa: E402
from pipeline.storage import commit  # noqa: E402
from pipeline.tokenize.writer import write_token_shard  # noqa: E402
from pipeline.training.ema import EMA  # noqa: E402

BPE, EMBED = 49408, 64


def write_shards(root: str, rows: int, size: int, shards: int = 4) -> None:
    """Committed image shards (PNG renders of the embedded set) and the token shards made from them, same keys."""
    samples, _ = synth.make_samples(rows, 0.1, seed=0)
    rng = np.random.default_rng(0)
    meta = {"grid": 2, "embed_dim": EMBED, "dvae": {"vocab_size": 8}, "clip": {"model": "bench"},
            "tokenizer": {"vocab_size": BPE}, "preprocess": {}, "schema_version": "1"}
    images, tokens = os.path.join(root, "images"), os.path.join(root, "tokens")
    os.makedirs(images, exist_ok=True)
    per = rows // shards
    for sid in range(shards):
        part = samples[sid * per:(sid + 1) * per]
        keys = [f"{sid:05d}{i:04d}" for i in range(per)]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for key, s in zip(keys, part):
                for ext, data in (("png", synth.render_png(s, size)), ("txt", s.caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names = (f"{sid:05d}.tar", f"{sid:05d}.parquet")
        open(os.path.join(images, names[0]), "wb").write(buf.getvalue())
        pq.write_table(pa.table({"key": keys, "status": ["success"] * per}), os.path.join(images, names[1]))
        fs, folder = commit.fs_and_path(images)
        files = {n: {"bytes": os.path.getsize(os.path.join(images, n)),
                     "sha256": commit.sha256_file(fs, os.path.join(images, n))} for n in names}
        commit.write_marker(fs, folder, sid, {"shard_id": sid, "count": per, "successes": per, "files": files})
        emb = rng.standard_normal((per, EMBED)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        write_token_shard(tokens, sid, {
            "key": keys, "url": [""] * per, "caption": [s.caption for s in part], "sha256": [""] * per,
            "width": [size] * per, "height": [size] * per,
            "text_tokens": [list(rng.integers(0, BPE, 12)) for _ in range(per)],
            "image_tokens": np.zeros((per, 4), np.int64), "clip_image_emb": emb, "clip_text_emb": emb,
            "clip_similarity": np.zeros(per, np.float32)}, meta)


def bare_loop(model: Decoder, d: DecoderConfig, batch: Any) -> Any:
    """What one writes by hand in PyTorch for the same training, on one in-memory batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=d.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=d.weight_decay)

    def schedule(step: int) -> float:
        if step < d.warmup_steps:
            return (step + 1) / d.warmup_steps
        t = (step - d.warmup_steps) / max(1, d.steps - d.warmup_steps)
        return d.min_lr_ratio + (1 - d.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ema = EMA(model, decay=d.ema_decay)
    gen = torch.Generator().manual_seed(0)

    def step(_: int) -> None:
        loss, _ = model.loss_parts(batch.image, batch.image_emb, batch.text, batch.valid, d.image_drop,
                                   d.caption_drop, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), d.gradient_clipping)
        opt.step()
        sched.step()
        ema.update(model)
        float(loss)  # the training loop reads the loss every step too

    return step


def timed_run(step: Any, min_s: float, start: int) -> dict[str, float]:
    """Steps until at least ``min_s`` seconds have passed; seconds per step."""
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_s:
        step(start + n)
        n += 1
    return {"steps": n, "seconds": elapsed, "step_s": elapsed / n}


def overhead(cfg: Config, root: str, args: argparse.Namespace) -> dict[str, Any]:
    d = cfg.decoder
    plan = make_decoder_plan(os.path.join(root, "tokens"), os.path.join(root, "images"), d.loader_unit_rows,
                             args.size, count_join=True)
    shape = decoder_shape(cfg, plan.meta, args.size)
    torch.manual_seed(0)
    ours_model, bare_model = Decoder(shape), Decoder(shape)
    bare_model.load_state_dict(ours_model.state_dict())
    task = DecoderTask(cfg, 0, 1, DecoderObjective(ours_model, d.image_drop, d.caption_drop), shape, plan)
    task.batches = task.loader.batches(0)  # what task.open does, without the metrics log
    fixed = next(task.loader.batches(0))  # the bare loop trains on in-memory tensors: no loader cost at all
    steps = {"ours": task.step, "bare": bare_loop(bare_model, d, fixed)}
    steps["ours"](0), steps["bare"](0)  # warm-up: allocator, first-call costs
    done = {"ours": 1, "bare": 1}

    def run(name: str) -> dict[str, float]:
        out = timed_run(steps[name], args.run_s, done[name])
        done[name] += out["steps"]
        return out

    # ratio > 1 would mean ours is faster; the headline reports ours / bare step time (lower is better).
    pairs = alternate({"bare": lambda: run("bare"), "ours": lambda: run("ours")}, args.pairs,
                      lambda bare, ours: ours["step_s"] / bare["step_s"], label="engine ")
    task.close()
    ours_s = statistics.median(p["ours"]["step_s"] for p in pairs["pairs"])
    return {**pairs, "ours_step_s_median": ours_s,
            "bare_step_s_median": statistics.median(p["bare"]["step_s"] for p in pairs["pairs"]),
            "train_samples_per_s": d.micro_batch_size / ours_s,
            "params": sum(p.numel() for p in bare_model.parameters()), "forward_gflops_per_image":
            forward_flops(shape) / 1e9, "zero_stage": task.ds["zero_optimization"]["stage"], "join": plan.join}


def ddim_rate(model: Decoder, batch: int, min_s: float, device: str = "cpu") -> dict[str, Any]:
    """Images/s of 50-step DDIM with guidance 3, runs of at least ``min_s`` seconds (the last one included)."""
    s = model.shape
    emb = torch.randn(batch, s.embed_dim, device=device)
    text = torch.randint(0, s.text_vocab, (batch, s.text_len), device=device) if s.conditioned_on_text else None

    def one() -> None:
        model.sample(emb, text, steps=50, sampler="ddim", guidance_scale=3.0,
                     generator=torch.Generator(device).manual_seed(0))
        if device == "cuda":
            torch.cuda.synchronize()

    one()
    rates, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < min_s or len(rates) < 2:
        t = time.perf_counter()
        one()
        rates.append(batch / (time.perf_counter() - t))
    return {"images_per_s_median": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates), "runs": len(rates), "batch": batch, "steps": 50, "guidance_scale": 3.0,
            "forwards_per_step": 2}


def gpu_1b(steps: int = 10, micro: int = 16) -> dict[str, Any]:
    """The 1b decoder at 64x64 in bf16 on one GPU through the same engine: samples/s and MFU; DDIM images/s."""
    cfg = Config(decoder=DecoderConfig(size="1b", image_size=64, micro_batch_size=micro, precision="bf16",
                                       steps=steps + 10, warmup_steps=1, num_procs=1, text_len=77))
    shape = decoder_shape(cfg, {"embed_dim": 768, "tokenizer": {"vocab_size": BPE}}, 64)
    model = Decoder(shape)
    engine = ds_seam.initialize(DecoderObjective(model, 0.1, 0.5), ds_seam.build_ds_config(cfg.decoder, 1, True))
    dev = engine.device
    pixels = torch.rand(micro, 3, 64, 64, device=dev) * 2 - 1
    emb = torch.randn(micro, 768, device=dev)
    text = torch.randint(0, BPE, (micro, 77), device=dev)
    valid = torch.ones(micro, dtype=torch.bool, device=dev)

    def step() -> None:
        loss = engine(text, pixels, emb, valid, generator=torch.Generator(dev).manual_seed(0))
        engine.backward(loss)
        engine.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    rate = steps * micro / (time.perf_counter() - t0)
    peak = prior_metrics.device_peak_tflops()
    flops = 3 * forward_flops(shape)
    ddim = ddim_rate(engine.module.model.eval(), 16, 10.0, "cuda")  # the engine's bf16 weights
    return {"device": torch.cuda.get_device_name(), "params": sum(p.numel() for p in model.parameters()),
            "image_size": 64, "micro_batch": micro, "samples_per_s": rate,
            "mfu": prior_metrics.mfu(rate, flops, 1, peak), "peak_tflops": peak, "ddim": ddim,
            **prior_metrics.memory_stats()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, help="image size (the demo's decoder: 32)")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=MIN_PAIRS)
    ap.add_argument("--run-s", type=float, default=MIN_RUN_S, help="minimum seconds of each timed run")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--sample-batch", type=int, default=8)
    args = ap.parse_args()
    state = machine_state()  # before any timed run: a busy machine is flagged in the result
    torch.set_num_threads(os.cpu_count() or 1)
    init_single_rank()
    with tempfile.TemporaryDirectory() as root:
        write_shards(root, args.rows, args.size)
        section = {"channels": args.channels, "channel_mult": "1,2,2", "num_res_blocks": 1, "attention_levels": "2",
                   "head_channels": 32, "context_dim": 64, "text_len": 16, "micro_batch_size": args.micro,
                   "steps": 100000, "warmup_steps": 20, "num_procs": 1, "loader_unit_rows": 64,
                   "shuffle_buffer": 512, "image_size": args.size}
        cfg = Config(run_dir=root, decoder=DecoderConfig(**section))
        engine = overhead(cfg, root, args)
        model = Decoder(decoder_shape(cfg, {"embed_dim": EMBED, "tokenizer": {"vocab_size": BPE}}, args.size))
        ddim = ddim_rate(model.eval(), args.sample_batch, args.run_s)
    result = {
        "headline": headline("decoder: engine step time / bare PyTorch step time (CPU, same U-Net, optimizer and EMA; "
                             "median of per-pair ratios)", engine["ratio"], 1.1, higher_is_better=False),
        "ddim_cpu": {"name": "decoder DDIM images/s on the CPU (50 steps, guidance 3)",
                     "value": round(ddim["images_per_s_median"], 3), **ddim},
        "engine": engine,
        "model": {**section, "embed_dim": EMBED, "caption_vocab": BPE},
        "gpu_1b": gpu_1b() if torch.cuda.is_available() else None,
        "machine": {**state, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "command": "python benchmarks/bench_decoder.py " + " ".join(sys.argv[1:]),
    }
    write_result("decoder", json.loads(json.dumps(result, default=float)))


if __name__ == "__main__":
    main()
