"""The prior's training engine against a bare PyTorch loop, and the streaming loader against training consumption.

    python benchmarks/bench_train.py [--layers 4] [--embd 256] [--grid 16] [--micro 8] [--pairs 5] [--min-run-s 20]
                                     [--stages 0,2,3] [--diffusion]

1. Engine overhead at each ZeRO stage a user would run: stage 0 on one rank (what a one-rank run builds), ZeRO-2
   and ZeRO-3 on two ranks (gloo on the CPU). Ours: streaming loader → caption dropout → the DeepSpeed engine as
   ``pipeline.runtime.ds_seam`` builds it. The peer: a bare PyTorch loop (in-memory tensors, torch AdamW with the
   same hyper-parameters, gradient clipping, the same warm-up/cosine schedule; ``DistributedDataParallel`` on two
   ranks) on the same model from the same initial weights. Runs alternate in A/B pairs, the order flipped each
   pair, each run at least ``--min-run-s`` seconds (the step count is set from a calibration, the same on every
   rank); the ratio is ours/bare seconds per step per pair, and each stage's figure is the median of its per-pair
   ratios with min and max. The headline is the worst stage's median. Goal ≤ 1.1×.
2. Loader: samples/s of ``TokenLoader`` alone vs the samples/s the training step consumes (ZeRO 0, one rank).
   Goal: ≥ 20×.
3. DeepSpeed's own ZeRO-3 estimator for the 12 B prior on 8 and 64 GPUs (per-GPU model-state memory).
4. ``--diffusion``: the diffusion prior (DALL-E 2) the same way, one rank, in rounds (not part of the headline).
5. On a GPU (only when one is present): the 1.3 B prior, seq 1,280, bf16, one device: tokens/s, MFU, peak memory;
   and a 1.3 B diffusion prior's samples/s and MFU.

Writes benchmarks/results/train.json and prints it as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _results import headline, machine_state, ratio_summary, write_result  # benchmarks/ on sys.path

from pipeline.config import PRIOR_SIZES, PriorConfig  # noqa: E402
from pipeline.prior import metrics as prior_metrics
from pipeline.prior.diffusion import EMA, DiffusionPrior, DiffusionShape  # noqa: E402
from pipeline.prior.loader import DataPlan, TokenLoader, make_plan  # noqa: E402
from pipeline.prior.objectives import ARObjective, DiffusionObjective  # noqa: E402
from pipeline.prior.transformer import DalleTransformer, PriorShape  # noqa: E402
from pipeline.runtime import ds_seam
from pipeline.tokenize.writer import write_token_shard  # noqa: E402


def write_tokens(folder: str, rows: int, grid: int, text_vocab: int, image_vocab: int, shards: int = 4,
                 embed_dim: int = 512) -> None:
    rng = np.random.default_rng(0)
    meta = {"grid": grid, "embed_dim": embed_dim, "dvae": {"vocab_size": image_vocab}, "clip": {"model": "bench"},
            "tokenizer": {"vocab_size": text_vocab}, "preprocess": {}, "schema_version": "1"}
    per = rows // shards
    for s in range(shards):
        emb = rng.standard_normal((per, embed_dim)).astype(np.float32)
        write_token_shard(folder, s, {
            "key": [f"{s:05d}{i:05d}" for i in range(per)], "url": [""] * per, "caption": [""] * per,
            "sha256": [""] * per, "width": [256] * per, "height": [256] * per,
            "text_tokens": [list(rng.integers(0, text_vocab, rng.integers(3, 30))) for _ in range(per)],
            "image_tokens": rng.integers(0, image_vocab, (per, grid * grid)), "clip_image_emb": emb,
            "clip_text_emb": emb, "clip_similarity": np.zeros(per, np.float32)}, meta)


def init_single_rank() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    ds_seam.init_distributed()


def bare_loop(model: torch.nn.Module, cfg: PriorConfig):
    """The peer: what one writes by hand in PyTorch for the same training (``model``'s forward is the loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return step / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    def step(text: torch.Tensor, image: torch.Tensor) -> float:
        loss = model(text, image)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.gradient_clipping)
        opt.step()
        sched.step()
        return float(loss)

    return step


def timed_steps(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


class _LossOf(torch.nn.Module):
    """The bare loop's model as a module whose forward is the loss (what DistributedDataParallel needs)."""

    def __init__(self, model: DalleTransformer, text_loss_weight: float):
        super().__init__()
        self.model, self.w = model, text_loss_weight

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.model.loss(text, image, self.w)


def _agree(n: int) -> int:
    """Rank 0's ``n`` on every rank (the step count of a timed run must be the same everywhere)."""
    box = [n]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return int(box[0])


def _timed(fn, n: int) -> float:
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    return time.perf_counter() - t0


def rank_main(rank: int, world: int, port: int, stage: int, opts: dict, plan_json: dict, out_path: str) -> None:
    """One rank of one stage's measurement (spawned): our engine and the bare loop, alternated in pairs."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ds_seam.init_distributed()
    shape, cfg = model_config(opts, stage, world)
    plan = DataPlan.from_json(plan_json)
    torch.manual_seed(0)
    ours_model, bare_model = DalleTransformer(shape), DalleTransformer(shape)
    bare_model.load_state_dict(ours_model.state_dict())
    ds = ds_seam.build_ds_config(cfg, world, False)
    engine = ds_seam.initialize(ARObjective(ours_model, cfg.text_loss_weight, cfg.caption_dropout), ds)
    loader = TokenLoader(plan, rank=rank, world=world, micro_batch=cfg.micro_batch_size, text_len=shape.text_len,
                         seed=0, shuffle_buffer=cfg.shuffle_buffer, expect_grid=shape.image_grid)
    batches = loader.batches(0)
    fixed = next(loader.batches(0))  # the bare loop trains on in-memory tensors: no loader cost at all
    peer: torch.nn.Module = _LossOf(bare_model, cfg.text_loss_weight)
    if world > 1:
        peer = torch.nn.parallel.DistributedDataParallel(peer)
    bare = bare_loop(peer, cfg)
    gen = torch.Generator().manual_seed(rank)

    def ours() -> None:
        b = next(batches)
        loss = engine(b.text, b.image, generator=gen)  # caption dropout inside, as in training
        engine.backward(loss)
        engine.step()
        float(loss)  # the training loop reads the loss every step too

    def plain() -> None:
        bare(fixed.text, fixed.image)

    _timed(ours, 2), _timed(plain, 2)  # warm-up: allocator, first-call costs, DeepSpeed's first steps
    calib = min(_timed(ours, 3), _timed(plain, 3)) / 3  # the faster side sets the count: both runs >= min_run_s
    n = _agree(max(3, math.ceil(1.15 * opts["min_run_s"] / calib)))
    pairs = []
    for k in range(opts["pairs"]):
        order = ["bare", "ours"] if k % 2 == 0 else ["ours", "bare"]
        secs = {name: _timed(ours if name == "ours" else plain, n) for name in order}
        pairs.append({"order": order, "steps": n, "ours_s": round(secs["ours"], 3), "bare_s": round(secs["bare"], 3),
                      "ratio": round(secs["ours"] / secs["bare"], 4)})
        if rank == 0:
            print(f"[bench] ZeRO {stage}, {world} rank(s), pair {k}: ours {secs['ours']:.1f}s bare "
                  f"{secs['bare']:.1f}s for {n} steps: {pairs[-1]['ratio']:.3f}x", flush=True)
    loader.close()
    if rank == 0:
        ours_step = statistics.median(p["ours_s"] for p in pairs) / n
        with open(out_path, "w") as f:
            json.dump({"zero_stage": engine.zero_optimization_stage(), "ranks": world, "pairs": pairs,
                       "ratio": ratio_summary([p["ratio"] for p in pairs]), "ours_step_s": ours_step,
                       "bare_step_s": statistics.median(p["bare_s"] for p in pairs) / n,
                       "train_samples_per_s": cfg.micro_batch_size * world / ours_step}, f)
    torch.distributed.destroy_process_group()


def model_config(opts: dict, stage: int = 0, world: int = 1) -> tuple[PriorShape, PriorConfig]:
    shape = PriorShape(49408, opts["text_len"], 8192, opts["grid"], opts["layers"], max(1, opts["embd"] // 64),
                       opts["embd"])
    cfg = PriorConfig(n_layer=opts["layers"], n_head=shape.n_head, n_embd=opts["embd"], text_len=opts["text_len"],
                      micro_batch_size=opts["micro"], steps=100_000, warmup_steps=10, zero_stage=stage,
                      num_procs=world, caption_dropout=0.1)
    return shape, cfg


def stage_overhead(stage: int, world: int, opts: dict, plan: DataPlan, tmp: str) -> dict:
    """``rank_main`` on ``world`` spawned ranks; rank 0's figures."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = os.path.join(tmp, f"stage{stage}_{world}.json")
    mp.spawn(rank_main, args=(world, port, stage, opts, plan.to_json(), out), nprocs=world, join=True)
    with open(out) as f:
        return json.load(f)


def diffusion_overhead(cfg: PriorConfig, plan, args, text_vocab: int) -> dict:
    """The diffusion prior through the same engine and loader (with EMA) vs a bare loop with the same EMA."""
    shape = DiffusionShape(text_vocab, cfg.text_len, int(plan.meta["embed_dim"]), cfg.n_layer, cfg.n_head, cfg.n_embd)
    torch.manual_seed(0)
    ours_model, bare_model = DiffusionPrior(shape), DiffusionPrior(shape)
    bare_model.load_state_dict(ours_model.state_dict())
    dcfg = PriorConfig(**{**cfg.__dict__, "kind": "diffusion", "size": ""})
    engine = ds_seam.initialize(DiffusionObjective(ours_model, dcfg.caption_dropout), ds_seam.build_ds_config(dcfg, 1,
                                                                                                               False))
    ours_ema, bare_ema = EMA(ours_model, dcfg.ema_decay), EMA(bare_model, dcfg.ema_decay)
    loader = TokenLoader(plan, rank=0, world=1, micro_batch=cfg.micro_batch_size, text_len=cfg.text_len, seed=0,
                         shuffle_buffer=cfg.shuffle_buffer, embeddings=True, heldout_percent=dcfg.heldout_percent)
    batches, fixed = loader.batches(0), next(loader.batches(0))
    opt = torch.optim.AdamW(bare_model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)

    def ours() -> None:
        b = next(batches)
        loss = engine(b.text, b.image, b.text_emb, b.image_emb, b.valid, generator=gen)
        engine.backward(loss)
        engine.step()
        ours_ema.update(ours_model)
        float(loss)

    def bare() -> None:
        loss, _ = bare_model.loss_parts(fixed.text, fixed.text_emb, fixed.image_emb, valid=fixed.valid,
                                        cond_drop=dcfg.caption_dropout, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), cfg.gradient_clipping)
        opt.step()
        bare_ema.update(bare_model)

    ours(), bare()
    ours_s, bare_s = [], []
    for _ in range(args.rounds):
        ours_s.append(timed_steps(ours, args.steps * 4))  # a diffusion step is ~10x cheaper: time more of them
        bare_s.append(timed_steps(bare, args.steps * 4))
    loader.close()
    o, b = statistics.median(ours_s), statistics.median(bare_s)
    return {"ours_step_s": o, "bare_step_s": b, "ratio": o / b, "ours_rounds_s": ours_s, "bare_rounds_s": bare_s,
            "params": sum(p.numel() for p in bare_model.parameters()), "seq_len": shape.seq_len,
            "embed_dim": shape.embed_dim, "train_samples_per_s": cfg.micro_batch_size / o}


def gpu_seconds(step, steps: int, warmup: int = 3) -> float:
    """Wall seconds of ``steps`` calls of ``step`` on the GPU, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def gpu_diffusion_run(steps: int = 20, micro: int = 64) -> dict:
    """A >= 1 B diffusion prior (1.3b size, ViT-L/14's 768-d embeddings, 77 caption tokens), bf16, one GPU."""
    n_layer, n_head, n_embd = PRIOR_SIZES["1.3b"]
    shape = DiffusionShape(49408, 77, 768, n_layer, n_head, n_embd)
    cfg = PriorConfig(kind="diffusion", size="1.3b", micro_batch_size=micro, precision="bf16", steps=steps + 5,
                      warmup_steps=1, num_procs=1, text_len=77)
    engine = ds_seam.initialize(DiffusionObjective(DiffusionPrior(shape), 0.1), ds_seam.build_ds_config(cfg, 1, True))
    dev = engine.device
    text = torch.randint(0, 49408, (micro, 77), device=dev)
    emb = torch.randn(micro, 768, device=dev)
    valid = torch.ones(micro, dtype=torch.bool, device=dev)

    def step() -> None:
        loss = engine(text, None, emb, emb, valid, generator=torch.Generator().manual_seed(0))
        engine.backward(loss)
        engine.step()

    rate = steps * micro / gpu_seconds(step, steps)
    peak = prior_metrics.device_peak_tflops()
    return {"params": sum(p.numel() for p in engine.module.parameters()), "samples_per_s": rate,
            "mfu": prior_metrics.mfu(rate, prior_metrics.flops_for(shape), 1, peak), **prior_metrics.memory_stats()}


def loader_rate(plan, shape: PriorShape, cfg: PriorConfig, batches: int) -> float:
    loader = TokenLoader(plan, rank=0, world=1, micro_batch=cfg.micro_batch_size, text_len=shape.text_len, seed=1,
                         shuffle_buffer=cfg.shuffle_buffer, expect_grid=shape.image_grid)
    it = loader.batches(0)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * cfg.micro_batch_size / (time.perf_counter() - t0)
    loader.close()
    return rate


def zero3_estimates() -> dict:
    """DeepSpeed's estimator for the paper's 12 B prior (DALL-E vocabularies), built on the meta device."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    n_layer, n_head, n_embd = PRIOR_SIZES["12b"]
    with torch.device("meta"):
        model = DalleTransformer(PriorShape(16384, 256, 8192, 32, n_layer, n_head, n_embd))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    out = {"params": total, "largest_layer_params": largest}
    for gpus in (8, 64):
        nodes = gpus // 8
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, 8, nodes, cpu_offload=False,
                                                          cpu_offload_params=False)
        cpu_off, gpu_off, _ = estimate_zero3_model_states_mem_needs(total, largest, 8, nodes, cpu_offload=True,
                                                                    cpu_offload_params=False)
        out[f"{gpus}_gpus"] = {"gpu_gb_per_device": gpu / 1e9, "with_optimizer_offload_gpu_gb": gpu_off / 1e9,
                               "with_optimizer_offload_cpu_gb_per_node": cpu_off / 1e9}
    return out


def gpu_run(steps: int = 20) -> dict:
    """The 1.3 B prior, seq 1,280 (256 text + 1,024 image tokens), bf16, on one GPU through the same engine."""
    n_layer, n_head, n_embd = PRIOR_SIZES["1.3b"]
    shape = PriorShape(16384, 256, 8192, 32, n_layer, n_head, n_embd)
    cfg = PriorConfig(size="1.3b", micro_batch_size=8, precision="bf16", steps=steps + 5, warmup_steps=1, num_procs=1,
                      text_len=256)
    engine = ds_seam.initialize(ARObjective(DalleTransformer(shape), 0.0, 0.0), ds_seam.build_ds_config(cfg, 1, True))
    text = torch.randint(0, 16384, (8, 256), device=engine.device)
    image = torch.randint(0, 8192, (8, 1024), device=engine.device)

    def step() -> None:
        loss = engine(text, image)
        engine.backward(loss)
        engine.step()

    rate = steps * 8 / gpu_seconds(step, steps)
    peak = prior_metrics.device_peak_tflops()
    return {"device": torch.cuda.get_device_name(), "samples_per_s": rate, "tokens_per_s": rate * shape.seq_len,
            "mfu": prior_metrics.mfu(rate, prior_metrics.prior_flops_per_sample(shape), 1, peak),
            "peak_tflops": peak, **prior_metrics.memory_stats()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--min-run-s", type=float, default=20.0)
    ap.add_argument("--stages", default="0,2,3", help="ZeRO stages: 0 runs on one rank, 2 and 3 on two")
    ap.add_argument("--diffusion", action="store_true", help="also the diffusion prior's overhead (rounds, 1 rank)")
    ap.add_argument("--steps", type=int, default=12, help="--diffusion: steps per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="--diffusion: rounds")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 pair of 3 s runs per stage")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.min_run_s = 1, 3.0
    state = machine_state()
    opts = {k: getattr(args, k) for k in ("layers", "embd", "grid", "text_len", "micro", "pairs", "min_run_s")}
    shape, cfg = model_config(opts)
    stages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_tokens(tmp, args.rows, args.grid, 49408, 8192)
        plan = make_plan(tmp, cfg.loader_unit_rows)
        for stage in (int(x) for x in args.stages.split(",")):
            world = 1 if stage == 0 else 2
            stages[f"zero{stage}_{world}rank"] = stage_overhead(stage, world, opts, plan, tmp)
        zero0 = stages.get("zero0_1rank")
        load = loader_rate(plan, shape, cfg, batches=400)
        diffusion = None
        if args.diffusion:
            torch.set_num_threads(os.cpu_count() or 1)
            init_single_rank()
            diffusion = diffusion_overhead(cfg, plan, args, 49408)
    worst = max(stages, key=lambda k: stages[k]["ratio"]["median"])
    result = {
        "headline": headline("prior_engine_step_time_over_bare_pytorch_worst_zero_stage", stages[worst]["ratio"],
                             1.1, higher_is_better=False, stage=worst,
                             per_stage={k: v["ratio"] for k, v in stages.items()},
                             basis="median over alternated pairs of ours/bare seconds per step (CPU, same model and "
                                   "optimizer), the worst of ZeRO 0 on one rank and ZeRO 2 and 3 on two ranks"),
        "previous_headline": {"value": 1.00, "basis": "ZeRO off on one rank only, rounds always in the same order"},
        "stages": stages,
        "loader": {"name": "loader samples/s / training samples/s (ZeRO 0, one rank)",
                   "value": round(load / zero0["train_samples_per_s"], 1) if zero0 else None, "goal": 20,
                   "higher_is_better": True, "loader_samples_per_s": load},
        "diffusion": ({"name": "diffusion prior: engine step time / bare PyTorch step time (CPU, same model, "
                       "optimizer and EMA)", "value": round(diffusion["ratio"], 3), "goal": 1.1,
                       "higher_is_better": False, **diffusion} if diffusion else "not run (--diffusion)"),
        "model": {"n_layer": args.layers, "n_embd": args.embd, "seq_len": shape.seq_len, "micro_batch": args.micro,
                  "params": sum(p.numel() for p in DalleTransformer(shape).parameters())},
        "pairs": args.pairs, "min_run_s": args.min_run_s, "quick": args.quick,
        "zero3_12b_estimate": zero3_estimates(),
        "gpu_1_3b": gpu_run() if torch.cuda.is_available() else None,
        "gpu_diffusion_1_3b": gpu_diffusion_run() if torch.cuda.is_available() else None,
        "machine": {**state, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
    }
    write_result("train", result)


if __name__ == "__main__":
    main()
