"""KV-cached vs uncached image-token generation on the same model, same seed.

    python benchmarks/bench_sample.py [--grid 32] [--layers 2] [--embd 64] [--batch 4] [--pairs 5] [--min-run-s 20]

Both paths are warmed up (one call each, which also checks they draw identical tokens), then timed in A/B pairs,
the order flipped each pair, each run repeating generation for at least ``--min-run-s`` seconds; the ratio is
cached/uncached image tokens/s per pair and the headline is their median, min and max beside it. The uncached path
is our own reference sampler (it recomputes the whole prefix each position, O(N²) against the cache's O(N)): the
ratio says what the cache buys at this grid, not how we compare with another library.

Writes benchmarks/results/sample.json and prints it as the last line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from _results import alternate, headline, machine_state, write_result  # benchmarks/ is on sys.path

from pipeline.dvae.model import DVAE, DVAEShape  # noqa: E402
from pipeline.prior.transformer import DalleTransformer, PriorShape, pad_text  # noqa: E402


def timed(fn) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def demo_images_per_s(batch: int, rounds: int = 3) -> dict:
    """Images/s of the demo's models (configs/demo.yaml shapes: prior 4×128, 8×8 grid of 128 codes, 32 px dVAE):
    KV-cached generation plus dVAE decode, as `sample` runs them (weights random: speed does not depend on them)."""
    shape = PriorShape(text_vocab=49408, text_len=16, image_vocab=128, image_grid=8, n_layer=4, n_head=4, n_embd=128)
    prior = DalleTransformer(shape).eval()
    dvae = DVAE(DVAEShape(vocab_size=128, n_hid=32, group_count=3, recon="mse")).eval()
    text = pad_text([[320, 1000 + i] for i in range(batch * 8)], shape.text_len, shape.text_vocab)

    def draw() -> torch.Tensor:
        with torch.no_grad():
            codes = prior.generate(text, generator=torch.Generator().manual_seed(0))
            return dvae.decode(codes.view(-1, 8, 8))

    draw()
    times = [timed(draw)[1] for _ in range(rounds)]
    return {"images_per_s": len(text) / min(times), "batch": len(text), "rounds_s": times}


def gpu_images_per_s(batch: int = 8) -> dict:
    """The 1.3 B prior at the full 32×32 grid, bf16, KV-cached, one GPU: image-token rate and images/s."""
    from pipeline.config import PRIOR_SIZES

    n_layer, n_head, n_embd = PRIOR_SIZES["1.3b"]
    shape = PriorShape(16384, 256, 8192, 32, n_layer, n_head, n_embd)
    model = DalleTransformer(shape).cuda().to(torch.bfloat16).eval()
    text = pad_text([[5, 6 + i] for i in range(batch)], 256, 16384).cuda()
    model.generate(text[:1], generator=torch.Generator(device="cuda").manual_seed(0))
    torch.cuda.synchronize()
    _, seconds = timed(lambda: model.generate(text, generator=torch.Generator(device="cuda").manual_seed(0)))
    return {"device": torch.cuda.get_device_name(), "images_per_s": batch / seconds,
            "image_tokens_per_s": batch * 1024 / seconds, "batch": batch}


def repeated(fn, tokens: int, min_s: float) -> dict:
    """``fn`` again and again for at least ``min_s`` seconds: image tokens/s over the whole run."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        seconds = time.perf_counter() - t0
        if seconds >= min_s:
            return {"seconds": round(seconds, 3), "calls": calls, "tokens_per_s": calls * tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, default=32, help="image grid side (32: DALL-E's 1,024 tokens)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--min-run-s", type=float, default=20.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: grid 8, 1 pair of 2 s runs")
    args = ap.parse_args()
    if args.quick:
        args.grid, args.pairs, args.min_run_s = 8, 1, 2.0
    state = machine_state()
    torch.manual_seed(0)
    shape = PriorShape(text_vocab=49408, text_len=16, image_vocab=512, image_grid=args.grid, n_layer=args.layers,
                       n_head=4, n_embd=args.embd)
    model = DalleTransformer(shape).eval()
    text = pad_text([[320, 1000 + i] for i in range(args.batch)], shape.text_len, shape.text_vocab)
    cached_fn = lambda: model.generate(text, top_k=50, generator=torch.Generator().manual_seed(1))
    plain_fn = lambda: model.generate_uncached(text, top_k=50, generator=torch.Generator().manual_seed(1))
    cached, t_cached = timed(cached_fn)  # the warm-up calls, and the check that both paths draw the same tokens
    plain, t_plain = timed(plain_fn)
    tokens = args.batch * shape.image_len
    runs = alternate({"uncached": lambda: repeated(plain_fn, tokens, args.min_run_s),
                      "cached": lambda: repeated(cached_fn, tokens, args.min_run_s)}, args.pairs,
                     lambda a, b: b["tokens_per_s"] / a["tokens_per_s"])
    demo = demo_images_per_s(args.batch)
    gpu = gpu_images_per_s() if torch.cuda.is_available() else None
    result = {
        "headline": headline("kv_cache_speedup", runs["ratio"], 5.0, identical_tokens=bool(torch.equal(cached, plain)),
                             basis="median over alternated pairs of cached/uncached image tokens/s (our own "
                                   "uncached reference sampler), after a warm-up call of each"),
        "previous_headline": {"value": 13.9, "basis": "one run of each, no warm-up"},
        "identical_tokens": bool(torch.equal(cached, plain)),
        "warmup_s": {"cached": t_cached, "uncached": t_plain},
        "runs": runs, "image_tokens": shape.image_len, "batch": args.batch, "quick": args.quick,
        "model": {"n_layer": args.layers, "n_embd": args.embd, "grid": args.grid},
        "demo_model_cpu": demo,
        "gpu_1_3b": gpu,
        "machine": {**state, "torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads()},
    }
    write_result("sample", result)


if __name__ == "__main__":
    main()
