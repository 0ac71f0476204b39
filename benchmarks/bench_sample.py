"""KV-cached vs uncached image-token generation on the same model, same seed, in one run.

    python benchmarks/bench_sample.py [--grid 32] [--layers 2] [--embd 64] [--batch 4]

Writes benchmarks/results/sample.json and prints it as the last line.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from _results import write_result  # benchmarks/ is sys.path[0] when run as a script

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grid", type=int, default=32, help="image grid side (32: DALL-E's 1,024 tokens)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = PriorShape(text_vocab=49408, text_len=16, image_vocab=512, image_grid=args.grid, n_layer=args.layers,
                       n_head=4, n_embd=args.embd)
    model = DalleTransformer(shape).eval()
    text = pad_text([[320, 1000 + i] for i in range(args.batch)], shape.text_len, shape.text_vocab)
    cached, t_cached = timed(lambda: model.generate(text, top_k=50, generator=torch.Generator().manual_seed(1)))
    plain, t_plain = timed(lambda: model.generate_uncached(text, top_k=50, generator=torch.Generator().manual_seed(1)))
    tokens = args.batch * shape.image_len
    speedup = t_plain / t_cached
    demo = demo_images_per_s(args.batch)
    gpu = gpu_images_per_s() if torch.cuda.is_available() else None
    result = {
        "headline": {"name": "kv_cache_speedup", "value": round(speedup, 2), "goal": ">= 5x faster with the cache",
                     "higher_is_better": True},
        "identical_tokens": bool(torch.equal(cached, plain)),
        "cached_tokens_per_s": tokens / t_cached, "uncached_tokens_per_s": tokens / t_plain,
        "cached_s": t_cached, "uncached_s": t_plain, "image_tokens": shape.image_len, "batch": args.batch,
        "model": {"n_layer": args.layers, "n_embd": args.embd},
        "demo_model_cpu": demo,
        "gpu_1_3b": gpu,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": "cpu", "threads": torch.get_num_threads()},
    }
    write_result("sample", result)


if __name__ == "__main__":
    main()
