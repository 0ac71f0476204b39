"""dVAE encode throughput at DALL-E's full size: our ``DVAE.encode`` vs OpenAI's ``dall_e`` Encoder, same weights.

    python benchmarks/bench_dvae.py [--batch 2] [--pairs 5] [--min-run-s 20] [--image-size 256] [--quick]
                                    [--variants fp32,fp32_channels_last,bf16,bf16_channels_last]

The architecture is OpenAI's published one (n_hid 256, 2 blocks per group, 4 groups, vocab 8192: 256×256 images →
32×32 codes). A ``dall_e`` Encoder/Decoder pair with random weights is saved with ``torch.save`` exactly like OpenAI's
``encoder.pkl`` / ``decoder.pkl`` and loaded into ours with ``pipeline.dvae.openai.load_openai``, so both run the same
numbers.

On the CPU each comparison gives ``dall_e`` the same precision and memory layout as ours (fp32 contiguous, fp32
channels_last; bf16 autocast in both layouts only where this CPU has native bf16, and only if its tokens equal
``dall_e``'s in the same mode). A variant enters the comparison only when our tokens are identical to ``dall_e``'s
(``tokens_identical: true``); a faster variant that changes the tokens is reported, never headlined. Each variant is
timed in A/B pairs, the order flipped every pair, each run encoding batches for at least ``--min-run-s`` seconds
after a warm-up call; the ratio is ours/dall_e images/s per pair, and the headline is the median of the fp32
contiguous variant's per-pair ratios (what tokenize runs on a CPU), with min and max beside it; the other variants'
medians are beside the headline. By default the two fp32 layouts run (5 pairs of two >= 20 s runs each: about 7
minutes on 2 cores); the bf16 ones, which can only be reported, run when ``--variants`` names them. With CUDA,
images/s and MFU (conv FLOPs per image over the device's dense bf16 peak) are measured on the GPU as well (not part
of the headline).

Writes benchmarks/results/dvae.json and prints it as the last line.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from importlib import metadata
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _results import alternate, headline, machine_state, write_result  # benchmarks/ is sys.path[0]

from pipeline.dvae.model import DVAE, DVAEShape, Encoder  # noqa: E402
from pipeline.dvae.openai import load_openai  # noqa: E402

FULL = DVAEShape(vocab_size=8192, n_hid=256, group_count=4, n_blk_per_group=2, n_init=128)

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, matched against torch.cuda.get_device_name().
BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12)]


def conv_flops_per_image(shape: DVAEShape, image_size: int) -> int:
    """2·Cin·Cout·k² multiply-adds per output pixel, summed over the encoder's convolutions (shapes from a meta run)."""
    with torch.device("meta"):
        enc = Encoder(shape)
    total = 0

    def hook(mod: torch.nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += 2 * mod.in_channels * mod.out_channels * kh * kw * out.shape[-2] * out.shape[-1] // mod.groups

    for m in enc.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    enc(torch.empty(1, shape.channels, image_size, image_size, device="meta"))
    return total


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Photo-like test input: a few octaves of upsampled noise (encoders see structure, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, size, size)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)):
        x += weight * F.interpolate(torch.rand(n, 3, cells, cells, generator=g), size=(size, size), mode="bilinear",
                                    align_corners=False)
    return x.clamp(0, 1).contiguous()


def build_models(shape: DVAEShape) -> tuple[torch.nn.Module, DVAE, float]:
    """dall_e Encoder/Decoder with random weights → encoder.pkl/decoder.pkl → ours via load_openai."""
    import dall_e

    torch.manual_seed(0)
    enc = dall_e.encoder.Encoder(n_hid=shape.n_hid, n_blk_per_group=shape.n_blk_per_group,
                                 vocab_size=shape.vocab_size, requires_grad=False).eval()
    dec = dall_e.decoder.Decoder(n_init=shape.n_init, n_hid=shape.n_hid, n_blk_per_group=shape.n_blk_per_group,
                                 vocab_size=shape.vocab_size, requires_grad=False)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(enc, os.path.join(tmp, "encoder.pkl"))
        torch.save(dec, os.path.join(tmp, "decoder.pkl"))
        del dec
        t0 = time.perf_counter()
        ours = load_openai(os.path.join(tmp, "encoder.pkl"), os.path.join(tmp, "decoder.pkl"))
        load_s = time.perf_counter() - t0
    return enc, ours, load_s


def _modes(model: DVAE, model_cl: DVAE, device: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Our encode as is, in channels_last, and under bf16 autocast (both layouts)."""
    cl = torch.channels_last

    def bf16(m: DVAE, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device, dtype=torch.bfloat16):
                return m.encode(x.contiguous(memory_format=cl) if channels_last else x)
        return run

    return {"ours_fp32": model.encode, "ours_channels_last": lambda x: model_cl.encode(x.contiguous(memory_format=cl)),
            "ours_bf16": bf16(model, False), "ours_bf16_channels_last": bf16(model_cl, True)}


def dall_e_fn(enc: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    import dall_e

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return enc(dall_e.map_pixels(x)).argmax(1)
    return run


def probe_gflops() -> dict[str, float]:
    """GFLOP/s of one mid-network 3×3 conv in each of our modes on this CPU. Without native bf16 (AVX2 only), bf16
    convolutions can be 5-200× slower than fp32; the probe keeps such variants from eating the time budget."""
    x, w = torch.rand(1, 256, 32, 32), torch.randn(256, 256, 3, 3) / 48  # 256 → 256 channels, 3×3: 1.2 GFLOP
    flops = 2 * 256 * 256 * 9 * 32 * 32
    rates = {}
    for name, dtype, cl in (("ours_fp32", None, False), ("ours_channels_last", None, True),
                            ("ours_bf16", torch.bfloat16, False), ("ours_bf16_channels_last", torch.bfloat16, True)):
        xx, ww = (x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)) \
            if cl else (x, w)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16) if dtype else nullcontext():
            t0 = time.perf_counter()
            F.conv2d(xx, ww, padding=1)
            best = time.perf_counter() - t0
            for _ in range(3 if best < 0.5 else 0):  # best of 3 after a warm-up, unless it is plainly slow
                t0 = time.perf_counter()
                F.conv2d(xx, ww, padding=1)
                best = min(best, time.perf_counter() - t0)
            rates[name] = flops / best / 1e9
    return rates


def interleaved(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeats: int,
                sync: Callable[[], None] = lambda: None) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """One warm-up round, then ``repeats`` rounds; the order rotates each round so drift hits all alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, torch.Tensor] = {}
    for r in range(repeats + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            out = fns[name](x)
            sync()
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            tokens[name] = out.cpu()
            print(f"  round {r}{' (warm-up)' if not r else ''} {name}: {dt:.2f}s", file=sys.stderr, flush=True)
    return times, tokens


def summarise(times: dict[str, list[float]], tokens: dict[str, torch.Tensor], batch: int, flops: int,
              ref: str = "dall_e") -> dict[str, Any]:
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"images_per_s": batch / med, "median_s": med, "times_s": [round(t, 4) for t in ts],
                     "gflops_per_s": flops * batch / med / 1e9,
                     "token_agreement_vs_dall_e": float((tokens[name] == tokens[ref]).float().mean()),
                     "identical_tokens_vs_dall_e": bool(torch.equal(tokens[name], tokens[ref]))}
    return out


def bf16_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK:
        if key in name:
            return peak
    return None


def gpu_bench(enc: torch.nn.Module, ours: DVAE, x_cpu: torch.Tensor, repeats: int, flops: int,
              device: str = "cuda") -> dict[str, Any]:
    """Images/s and MFU on the GPU: ours in bf16 autocast (contiguous and channels_last) and fp32, and dall_e (its
    own fp16 path) on the same weights and images. MFU is conv FLOPs × images/s over the dense bf16 peak."""
    dev = torch.device(device)
    modes = _modes(copy.deepcopy(ours).to(dev), copy.deepcopy(ours).to(dev, memory_format=torch.channels_last),
                   dev.type)
    fns = {"dall_e": dall_e_fn(copy.deepcopy(enc).to(dev)), "ours_fp32": modes["ours_fp32"],
           "ours_bf16": modes["ours_bf16"], "ours_bf16_channels_last": modes["ours_bf16_channels_last"]}
    x = x_cpu.to(dev)
    torch.backends.cudnn.benchmark = True
    times, tokens = interleaved(fns, x, repeats, sync=torch.cuda.synchronize if dev.type == "cuda" else lambda: None)
    res = summarise(times, tokens, len(x), flops)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    peak = bf16_peak(name)
    for r in res.values():
        r["mfu_bf16"] = (flops * r["images_per_s"] / peak) if peak else None
    best = max((n for n in res if n.startswith("ours")), key=lambda n: res[n]["images_per_s"])
    return {"device": name, "bf16_peak_flops": peak, "batch": len(x), "variants": res, "best_ours": best,
            "images_per_s": res[best]["images_per_s"], "mfu": res[best]["mfu_bf16"], "goal_mfu": 0.35,
            "meets_goal": bool(peak and res[best]["mfu_bf16"] >= 0.35),
            "max_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        dalle_version = metadata.version("DALL-E")
    except metadata.PackageNotFoundError:
        dalle_version = None
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dall_e": dalle_version, "load_avg_1m": os.getloadavg()[0],
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


VARIANTS = {"fp32": (None, False), "fp32_channels_last": (None, True), "bf16": (torch.bfloat16, False),
            "bf16_channels_last": (torch.bfloat16, True)}


def variant_fns(enc: torch.nn.Module, ours: DVAE, dtype: torch.dtype | None, channels_last: bool,
                device: str = "cpu") -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """dall_e and ours in one precision and memory layout: the same settings for both."""
    import dall_e

    cl = torch.channels_last
    e, o = copy.deepcopy(enc), copy.deepcopy(ours)
    if channels_last:
        e, o = e.to(memory_format=cl), o.to(memory_format=cl)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=cl) if channels_last else x

    def mode() -> Any:
        return torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()

    def run_dall_e(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), mode():
            return e(dall_e.map_pixels(prep(x))).argmax(1)

    def run_ours(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), mode():
            return o.encode(prep(x))

    return {"dall_e": run_dall_e, "ours": run_ours}


def timed_run(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, min_s: float) -> dict[str, Any]:
    """Encode ``x`` again and again for at least ``min_s`` seconds: images/s over the whole run."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        calls += 1
        seconds = time.perf_counter() - t0
        if seconds >= min_s:
            return {"seconds": round(seconds, 3), "calls": calls, "images": calls * len(x),
                    "images_per_s": calls * len(x) / seconds}


def cpu_bench(enc: torch.nn.Module, ours: DVAE, x: torch.Tensor, pairs: int, min_s: float,
              variants: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Each variant: tokens checked against dall_e in the same mode (and against dall_e fp32), then, when identical,
    ``pairs`` alternated A/B pairs of timed runs."""
    rates = probe_gflops()
    ref = variant_fns(enc, ours, None, False)["dall_e"](x)
    out: dict[str, Any] = {}
    for name in variants:
        dtype, cl = VARIANTS[name]
        probe = rates["ours_" + name] if "ours_" + name in rates else None
        if dtype is not None and probe is not None and probe < rates["ours_fp32"] / 2:
            out[name] = {"skipped": f"no native bf16 here (probe {probe:.1f} vs fp32 {rates['ours_fp32']:.1f} "
                                    "GFLOP/s)"}
            print(f"  {name}: skipped ({out[name]['skipped']})", file=sys.stderr, flush=True)
            continue
        fns = variant_fns(enc, ours, dtype, cl)
        tokens = {k: f(x) for k, f in fns.items()}  # also the warm-up call of each
        same = bool(torch.equal(tokens["ours"], tokens["dall_e"]))
        rec: dict[str, Any] = {"tokens_identical": same,
                               "token_agreement_vs_dall_e_same_mode": float((tokens["ours"] == tokens["dall_e"])
                                                                            .float().mean()),
                               "token_agreement_vs_dall_e_fp32": float((tokens["ours"] == ref).float().mean())}
        if not same:
            rec["skipped"] = "our tokens differ from dall_e's in the same mode: not compared"
            out[name] = rec
            continue
        runs = {"dall_e": lambda f=fns["dall_e"]: timed_run(f, x, min_s),
                "ours": lambda f=fns["ours"]: timed_run(f, x, min_s)}
        rec.update(alternate(runs, pairs, lambda a, b: b["images_per_s"] / a["images_per_s"], f"{name} "))
        for tool in ("dall_e", "ours"):
            rec[f"{tool}_images_per_s_median"] = statistics.median(p[tool]["images_per_s"] for p in rec["pairs"])
        out[name] = rec
    return out, rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2, help="images per CPU encode call")
    ap.add_argument("--pairs", type=int, default=5, help="alternated A/B pairs per variant")
    ap.add_argument("--min-run-s", type=float, default=20.0, help="seconds each timed run encodes for, at least")
    ap.add_argument("--variants", default="fp32,fp32_channels_last",
                    help=f"comma-separated, of {', '.join(VARIANTS)}; fp32 (the headline) always runs")
    ap.add_argument("--image-size", type=int, default=256, help="256: DALL-E's 32x32 grid")
    ap.add_argument("--gpu-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="GPU: timed rounds after the warm-up round")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 1, 1 pair of 2 s runs, fp32 only")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.pairs, args.min_run_s, args.gpu_batch, args.variants = 1, 1, 2.0, 16, "fp32"
    variants = ["fp32", *(v for v in args.variants.split(",") if v and v != "fp32")]  # fp32 is the headline
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    state = machine_state()
    shape = FULL
    flops = conv_flops_per_image(shape, args.image_size)
    t0 = time.perf_counter()
    enc, ours, load_s = build_models(shape)
    build_s = time.perf_counter() - t0
    x = smooth_images(args.batch, args.image_size)
    print(f"dVAE encode at {args.image_size}px, {flops / 1e9:.1f} GFLOP/image, batch {args.batch}", file=sys.stderr)
    cpu, rates = cpu_bench(enc, ours, x, args.pairs, args.min_run_s, variants)
    fp32 = cpu.get("fp32", {})
    head = headline("dvae_encode_cpu_ours_over_dall_e_fp32", fp32["ratio"], 1.0, tokens_identical=True,
                    basis="median over alternated pairs of ours/dall_e images/s, both fp32 contiguous, same "
                          "weights, identical tokens") if "ratio" in fp32 else \
        {"name": "dvae_encode_cpu_ours_over_dall_e_fp32", "value": None, "goal": 1.0, "higher_is_better": True,
         "tokens_identical": fp32.get("tokens_identical", False), "basis": fp32.get("skipped", "not run")}
    head["other_variants"] = {n: v["ratio"] for n, v in cpu.items() if n != "fp32" and "ratio" in v}
    result: dict[str, Any] = {
        "headline": head,
        "previous_headline": {"value": 2.70, "basis": "best of four variants (a bf16 one, 97.75 % token agreement) "
                                                       "over dall_e fp32; replaced by the rule above"},
        "cpu": cpu, "cpu_probe_gflops": rates, "gflop_per_image": flops / 1e9,
        "grid": shape.grid(args.image_size), "image_size": args.image_size, "batch": args.batch,
        "pairs": args.pairs, "min_run_s": args.min_run_s, "quick": args.quick, "load_openai_s": load_s,
        "build_and_save_s": build_s,
        "model": {"n_hid": shape.n_hid, "vocab_size": shape.vocab_size, "n_blk_per_group": shape.n_blk_per_group,
                  "group_count": shape.group_count,
                  "encoder_params": sum(p.numel() for p in ours.encoder.parameters())},
        "gpu": None,
        "machine": {**machine(), **state},
    }
    if torch.cuda.is_available():
        result["gpu"] = gpu_bench(enc, ours, smooth_images(args.gpu_batch, args.image_size, seed=1),
                                  max(args.repeats, 3), flops)
    write_result("dvae", result)


if __name__ == "__main__":
    main()
