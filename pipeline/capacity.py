"""Capacity planner: storage, hours and GPU memory per stage (download → tokenize → train the prior, ZeRO-3).

Every figure carries a ``basis``: ``measured`` (from the real schema, the real model, DeepSpeed's own estimator or a
benchmark result file, with the machine it ran on) or ``assumed`` (a documented default). Nothing here allocates
real weights: the prior is built on the meta device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

JPEG_RATIO = 0.1            # assumed: JPEG bytes / raw RGB bytes
META_BYTES = 256            # assumed: per-sample metadata (key, url, caption, sha256, size) next to each image
EMBED_DIM = 768             # CLIP ViT-L/14 embedding width stored in token shards
CLUSTER_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "config.yaml"
BYTES_PER_PARAM_CKPT = 16   # fp32 weights (4) + Adam m (4) + Adam v (4) + fp32 master copy (4)
ACT_BYTES_NO_CKPT = 34      # per token per d_model per layer, Megatron's estimate (bf16, no attention-score term)
ACT_BYTES_CKPT = 2          # per token per d_model per layer: the bf16 input kept at each checkpointed layer
DEFAULT_RATES = {
    "download_images_per_s_per_node": 1000.0,   # per 16-core CPU node
    "tokenize_images_per_s_per_gpu": 2000.0,
    "peak_flops_per_gpu": 989e12,               # H100 SXM dense bf16
    "mfu": 0.45,
    "epochs": 1,
    "cores_per_node": 16,
}


def _fig(value: Any, basis: str, note: str = "") -> dict[str, Any]:
    return {"value": value, "basis": basis, "note": note}


# ---------------------------------------------------------------- model

def text_vocab(cfg) -> int:
    """The BPE vocabulary tokenize writes and train-prior embeds: the open_clip tokenizer of the run's CLIP (a named
    model's, else the one the project's own CLIP uses: open_clip's SimpleTokenizer, 49,408 ids)."""
    import open_clip

    name = cfg.clip.model if cfg.clip.model and not cfg.clip.model.startswith("local-dir:") else "ViT-B-32"
    tok = open_clip.get_tokenizer(name)
    return int(getattr(tok, "vocab_size", None) or len(tok.encoder))


def token_meta(cfg) -> dict[str, Any]:
    """What the token shards' metadata would say for this config (the figures train-prior builds its model from):
    the tokenizer's vocabulary, the dVAE's codebook (OpenAI's 8192 when dvae.weights is openai) and its grid."""
    d = cfg.dvae
    openai = d.weights == "openai"
    down = 8 if openai else 2 ** (d.group_count - 1)
    return {"tokenizer": {"vocab_size": text_vocab(cfg)}, "dvae": {"vocab_size": 8192 if openai else d.vocab_size},
            "grid": cfg.download.image_size // down, "embed_dim": EMBED_DIM}


def prior_shape(cfg):
    """The shape train-prior would build for this config, through its own builder and ``token_meta``."""
    from pipeline.prior.objectives import prior_shape as build

    return build(cfg, token_meta(cfg))


def prior_params(cfg) -> tuple[int, int]:
    """(total parameters, largest layer's own parameters) of the model train-prior builds for ``cfg`` (its own
    ``build_objective``, either kind), on the meta device."""
    import torch

    from pipeline.prior.objectives import build_objective

    with torch.device("meta"):
        model = build_objective(cfg, prior_shape(cfg))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def zero3_on(total_params: int, largest_layer_params: int, gpus: int, gpus_per_node: int) -> int:
    """DeepSpeed's ZeRO-3 model-state estimate per GPU (``ds_seam.zero3_gpu_bytes``) for ``gpus`` GPUs laid out in
    nodes of ``gpus_per_node``."""
    from pipeline.runtime import ds_seam

    per_node = min(gpus, gpus_per_node)
    return ds_seam.zero3_gpu_bytes(total_params, largest_layer_params, per_node, max(1, math.ceil(gpus / per_node)))


def gpus_needed(total_params: int, largest_layer_params: int, act: int, gpu_mem_gb: float, gpus_per_node: int,
                limit: int = 1 << 20) -> int | None:
    """Fewest GPUs on which ZeRO-3 model states (DeepSpeed's estimate) plus ``act`` activation bytes fit in
    ``gpu_mem_gb`` each; None when even ``limit`` GPUs are not enough (activations alone do not fit)."""
    def fits(n: int) -> bool:
        return zero3_on(total_params, largest_layer_params, n, gpus_per_node) + act <= gpu_mem_gb * 1e9

    if not fits(limit):
        return None
    lo, hi = 0, 1  # fits(lo) is False (0 GPUs never fit); grow hi until it fits, then bisect
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    # Past one node the estimate (like the launcher) counts whole nodes: report the GPUs of those nodes.
    return hi if hi <= gpus_per_node else math.ceil(hi / gpus_per_node) * gpus_per_node


def activation_bytes(seq: int, d: int, layers: int, micro_batch: int, checkpointing: bool) -> int:
    """Assumed: no checkpointing seq·d·layers·micro·34 B; with checkpointing 2·seq·d·layers·micro B (the saved
    bf16 layer inputs) plus one layer's full 34·seq·d·micro B being recomputed."""
    if checkpointing:
        return ACT_BYTES_CKPT * seq * d * layers * micro_batch + ACT_BYTES_NO_CKPT * seq * d * micro_batch
    return ACT_BYTES_NO_CKPT * seq * d * layers * micro_batch


# ---------------------------------------------------------------- storage

def token_bytes_per_row(grid: int, text_len: int, embed_dim: int = EMBED_DIM, rows: int = 64, vocab: int = 49408,
                        image_vocab: int = 8192) -> float:
    """zstd Parquet bytes per row, measured by writing a ``rows``-row table in the real token schema (random tokens
    and embeddings: close to an upper bound, as real tokens compress a little better)."""
    from pipeline.storage import schema

    rng = np.random.default_rng(0)
    data = {
        "key": [f"{i:09d}" for i in range(rows)],
        "url": [f"https://images.example.com/{rng.integers(1 << 40):x}/photo.jpg" for _ in range(rows)],
        "caption": [f"a photo of a {w} on a table" for w in rng.choice(["cat", "dog", "red car", "bowl"], rows)],
        "sha256": [f"{rng.integers(1 << 62):016x}" * 4 for _ in range(rows)],
        "width": [256] * rows, "height": [256] * rows,
        "text_tokens": [rng.integers(0, vocab, text_len).tolist() for _ in range(rows)],
        "image_tokens": rng.integers(0, image_vocab, (rows, grid * grid)),
        "clip_image_emb": rng.standard_normal((rows, embed_dim)).astype(np.float16),
        "clip_text_emb": rng.standard_normal((rows, embed_dim)).astype(np.float16),
        "clip_similarity": rng.random(rows).astype(np.float32),
    }
    table = schema.build_table(data, grid, embed_dim, {"schema_version": schema.SCHEMA_VERSION, "grid": grid})
    return len(schema.table_bytes(table)) / rows


# ---------------------------------------------------------------- rates

def _load(name: str, results_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((results_dir / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _machine(d: dict[str, Any]) -> str:
    m = d.get("machine") or {}
    cores = m.get("cpu_limit_cores") or m.get("cpus") or m.get("cpu_count")
    return ", ".join(str(x) for x in (m.get("cpu"), f"{cores} cores" if cores else None,
                                         f"device {m['device']}" if m.get("device") else None) if x) or "unknown"


def _find(d: Any, keys: tuple[str, ...]) -> float | None:
    """First positive number under any of ``keys`` (searched depth-first)."""
    if isinstance(d, dict):
        for k in keys:
            v = d.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return float(v)
        for v in d.values():
            found = _find(v, keys)
            if found is not None:
                return found
    return None


def _download_rate(dl: dict[str, Any]) -> tuple[float, str] | None:
    """Our whole-command images/s as the download benchmark measured it: the median over its pairs, the slower of
    its protocols (``cases.web.<scheme>.pairs[].ours.wall_images_per_s``); or a flat measured figure of an older
    result file. Never its ``cpu_limit_images_per_s``: that is computed from per-image CPU work."""
    web = (dl.get("cases") or {}).get("web") or {}
    found = []
    for scheme in ("http", "https"):
        vals = [p["ours"]["wall_images_per_s"] for p in (web.get(scheme) or {}).get("pairs") or []
                if isinstance(p.get("ours"), dict) and p["ours"].get("wall_images_per_s")]
        if vals:
            found.append((float(np.median(vals)), f"whole command, median of {len(vals)} runs, web case {scheme}"))
    if found:
        return min(found)
    flat = _find({k: v for k, v in dl.items() if k != "cases"}, ("ours_images_per_s", "images_per_s"))
    return (flat, "measured") if flat else None


def resolve_rates(rates: dict | None = None, results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """Throughput figures with their basis: given (``rates``), measured (benchmark JSON) or assumed defaults."""
    rates = dict(rates or {})
    out = {k: _fig(v, "assumed") for k, v in DEFAULT_RATES.items()}
    cores = rates.get("cores_per_node", DEFAULT_RATES["cores_per_node"])

    dl = _load("download", results_dir)
    if dl:
        measured = _download_rate(dl)
        m = dl.get("machine") or {}
        bench_cores = m.get("cpu_limit_cores") or m.get("cpu_count")
        if measured and bench_cores:
            per_s, how = measured
            out["download_images_per_s_per_node"] = _fig(
                per_s / bench_cores * cores, "measured",
                f"{per_s:.0f} images/s ({how}) on {_machine(dl)}, scaled per core to {cores} cores")
        ceiling = _find(dl, ("cpu_limit_images_per_s",))
        if ceiling and not measured:  # a ceiling computed from per-image CPU work is no measured rate
            out["download_images_per_s_per_node"]["note"] = (
                f"the benchmark's CPU ceiling of {ceiling:.0f} images/s is computed, not measured: not used")

    tok = _load("tokenize", results_dir)
    if tok:
        per_s = _find(tok, ("full_tokenize_images_per_s", "images_per_s", "samples_per_s"))
        dev = str((tok.get("machine") or {}).get("device", "")).lower()
        if per_s and dev and dev != "cpu":
            out["tokenize_images_per_s_per_gpu"] = _fig(per_s, "measured", f"on {_machine(tok)}")
        elif per_s:
            out["tokenize_images_per_s_per_gpu"]["note"] = (
                f"benchmark measured {per_s:.1f} images/s on CPU ({_machine(tok)}), not a GPU rate")

    tr = _load("train", results_dir)
    if tr:
        mfu = _find(tr, ("mfu",))
        dev = str((tr.get("machine") or {}).get("device", "")).lower()
        if mfu and dev and dev != "cpu" and mfu < 1:
            out["mfu"] = _fig(mfu, "measured", f"on {_machine(tr)}")
        elif dev == "cpu":
            out["mfu"]["note"] = f"train benchmark ran on CPU ({_machine(tr)}): no GPU MFU measured"

    for k, v in rates.items():
        out[k] = _fig(v, "given")
    return out


# ---------------------------------------------------------------- plan

def plan(cfg, samples: int, gpus: int, gpu_mem_gb: float = 80.0, gpus_per_node: int = 8,
         rates: dict | None = None, results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    r = resolve_rates(rates, results_dir)
    rv = {k: v["value"] for k, v in r.items()}
    nodes = max(1, math.ceil(gpus / gpus_per_node))
    p = cfg.prior
    size = cfg.download.image_size
    meta = token_meta(cfg)
    grid, vocab = int(meta["grid"]), int(meta["tokenizer"]["vocab_size"])

    # storage
    img_bytes = size * size * 3 * JPEG_RATIO + META_BYTES
    tok_row = token_bytes_per_row(grid, p.text_len, vocab=vocab, image_vocab=int(meta["dvae"]["vocab_size"]))
    total, largest = prior_params(cfg)

    # memory
    z3 = zero3_on(total, largest, gpus, gpus_per_node)
    seq = p.text_len + grid * grid
    act = activation_bytes(seq, p.n_embd, p.n_layer, p.micro_batch_size, p.activation_checkpointing)
    need = z3 + act

    # time
    epochs = rv["epochs"]
    tokens = samples * epochs * seq
    flops = 6 * total * tokens
    dl_h = samples / (rv["download_images_per_s_per_node"] * nodes) / 3600
    tok_h = samples / (rv["tokenize_images_per_s_per_gpu"] * gpus) / 3600
    tr_h = flops / (gpus * rv["peak_flops_per_gpu"] * rv["mfu"]) / 3600

    def basis(*keys: str) -> str:
        return "measured" if all(r[k]["basis"] in ("measured", "given") for k in keys) else "assumed"

    stages = {
        "download": {
            "storage_bytes": _fig(samples * img_bytes, "assumed",
                                  f"{size}²×3 B × JPEG ratio {JPEG_RATIO} + {META_BYTES} B metadata per sample"),
            "hours": _fig(dl_h, basis("download_images_per_s_per_node"),
                          f"{rv['download_images_per_s_per_node']:.0f} images/s per node × {nodes} nodes"),
            "gpus": _fig(0, "assumed", f"CPU only ({nodes} nodes)"),
        },
        "tokenize": {
            "storage_bytes": _fig(samples * tok_row, "measured",
                                  f"{tok_row:.0f} B/row measured from the real schema (grid {grid}, text "
                                  f"{p.text_len}, embed {EMBED_DIM}, zstd)"),
            "hours": _fig(tok_h, basis("tokenize_images_per_s_per_gpu"),
                          f"{rv['tokenize_images_per_s_per_gpu']:.0f} images/s per GPU × {gpus} GPUs"),
            "gpus": _fig(gpus, "given"),
        },
        "train": {
            "storage_bytes": _fig(total * BYTES_PER_PARAM_CKPT, "measured",
                                  f"{total / 1e9:.2f} B params (measured) × 16 B (fp32 weights + Adam m, v + "
                                  "fp32 master)"),
            "hours": _fig(tr_h, basis("peak_flops_per_gpu", "mfu"),
                          f"6·N·tokens = {flops:.3g} FLOPs / ({gpus} × {rv['peak_flops_per_gpu']:.3g} × MFU "
                          f"{rv['mfu']})"),
            "gpus": _fig(gpus, "given"),
        },
    }
    return {
        "samples": samples, "gpus": gpus, "nodes": nodes, "gpus_per_node": gpus_per_node, "gpu_mem_gb": gpu_mem_gb,
        "image_size": size, "grid": grid, "text_len": p.text_len,
        "model": {"n_layer": p.n_layer, "n_head": p.n_head, "n_embd": p.n_embd, "text_vocab": vocab,
                  "image_vocab": int(meta["dvae"]["vocab_size"]),
                  "params": _fig(total, "measured", "DalleTransformer on the meta device"),
                  "largest_layer_params": _fig(largest, "measured", "max params owned directly by one module")},
        "token_bytes_per_row": _fig(tok_row, "measured", "real schema, 64 rows, zstd"),
        "image_bytes_per_sample": _fig(img_bytes, "assumed"),
        "train_tokens": tokens, "train_flops": flops, "epochs": epochs,
        "memory": {
            "zero3_gpu_bytes": _fig(z3, "measured", "deepspeed estimate_zero3_model_states_mem_needs, no offload"),
            "activation_bytes": _fig(act, "assumed",
                                     f"seq {seq} × d {p.n_embd} × layers {p.n_layer} × micro {p.micro_batch_size}"
                                     + (" × 2 B (+ one layer × 34 B), activation checkpointing"
                                        if p.activation_checkpointing else " × 34 B, no checkpointing")),
            "total_gpu_bytes": need,
            "fits": need <= gpu_mem_gb * 1e9,
            "gpus_needed": _fig(gpus_needed(total, largest, act, gpu_mem_gb, gpus_per_node), "measured",
                                "fewest GPUs where DeepSpeed's ZeRO-3 estimate + activations fit, no offload"),
        },
        "stages": stages,
        "rates": r,
        "cluster": cluster_launches(cfg, gpus),
    }


def cluster_launches(cfg, gpus: int) -> dict[str, Any]:
    """Per stage: what each worker asks for (its config keys), how many workers, and the node types and counts the
    autoscaler would launch for them on the cluster YAML (``cluster_config``, default cluster/config.yaml)."""
    from pipeline.runtime import demand
    from pipeline.storage.urls import read_bytes

    path = cfg.cluster_config or str(CLUSTER_CONFIG)
    types = demand.node_types_from_yaml(path, read_bytes(path).decode())
    d, t = cfg.download, cfg.tokenize

    def trainer(section) -> int:  # one worker per GPU of the plan when the section asks for GPUs
        return max(1, int(gpus // section.gpus_per_worker)) if section.gpus_per_worker else section.num_procs

    asks = {"download": ({"CPU": d.task_cpus, **d.resources}, d.max_in_flight),
            "tokenize (decode)": ({"CPU": t.decode_cpus, **t.decode_resources}, 1),
            "tokenize (encoders)": (t.request(), t.num_encoders),
            "train-dvae": (cfg.dvae.request(), cfg.dvae.num_procs),
            "train-prior": (cfg.prior.request(), trainer(cfg.prior)),
            "train-decoder": (cfg.decoder.request(), trainer(cfg.decoder)),
            "sample": (cfg.sample.request(), cfg.sample.num_workers)}
    out: dict[str, Any] = {"cluster_config": path, "stages": {}}
    for stage, (request, count) in asks.items():
        try:
            demand.check(stage, request, count, types, path)
            nodes: Any = demand.launch_plan(request, count, types)
        except Exception as exc:  # noqa: BLE001 - a plan that cannot be met is part of the answer
            nodes = f"cannot be met: {exc}"
        out["stages"][stage] = {"per_worker": request, "workers": count, "launches": nodes}
    return out


def worked_example(results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    """DALL-E paper scale (assumed): the 12b prior, 256 px images, 256 text tokens, 250 M pairs, 1024 × 80 GB GPUs."""
    from pipeline.config import load_config

    cfg = load_config(None, ["prior.size=12b", "prior.text_len=256", "download.image_size=256",
                             "prior.micro_batch_size=1", "prior.activation_checkpointing=true",
                             "dvae.vocab_size=8192", "dvae.group_count=4"])
    p = plan(cfg, samples=int(250e6), gpus=1024, gpu_mem_gb=80.0, gpus_per_node=8, results_dir=results_dir)
    p["example"] = _fig("DALL-E 12b, 250M pairs, 1024 GPUs × 80 GB", "assumed", "paper scale")
    return p


# ---------------------------------------------------------------- format

def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def format_plan(p: dict[str, Any]) -> str:
    m, mem = p["model"], p["memory"]
    lines = []
    if "example" in p:
        lines.append(f"Worked example: {p['example']['value']} ({p['example']['basis']}: {p['example']['note']})")
    lines.append(f"{p['samples']:,} samples, {p['gpus']} GPUs ({p['nodes']} nodes × {p['gpus_per_node']}, "
                 f"{p['gpu_mem_gb']:g} GB), image {p['image_size']} px → grid {p['grid']}, text {p['text_len']}")
    lines.append(f"prior: {m['n_layer']} layers × {m['n_embd']} ({m['n_head']} heads), text vocab "
                 f"{m['text_vocab']:,}, image vocab {m['image_vocab']:,} = {m['params']['value'] / 1e9:.2f} B params "
                 f"[{m['params']['basis']}]")
    lines.append("")
    lines.append(f"{'stage':<9} {'storage':>10} {'basis':<9} {'hours':>9} {'basis':<9} {'GPUs':>5}  note")
    for name, s in p["stages"].items():
        st, h, g = s["storage_bytes"], s["hours"], s["gpus"]
        lines.append(f"{name:<9} {_size(st['value']):>10} {st['basis']:<9} {h['value']:>9.2f} {h['basis']:<9} "
                     f"{g['value']:>5}  {st['note']}; {h['note']}")
    lines.append("")
    z3, act = mem["zero3_gpu_bytes"], mem["activation_bytes"]
    lines.append(f"ZeRO-3 model states per GPU: {_size(z3['value'])} [{z3['basis']}: {z3['note']}]")
    lines.append(f"activations per GPU:         {_size(act['value'])} [{act['basis']}: {act['note']}]")
    lines.append(f"total per GPU:               {_size(mem['total_gpu_bytes'])} of {p['gpu_mem_gb']:g} GB → "
                 f"{'fits' if mem['fits'] else 'DOES NOT FIT'}")
    fewest = mem["gpus_needed"]["value"]
    lines.append(f"GPUs needed to fit:          {fewest if fewest else 'none: activations alone exceed a GPU'} "
                 f"[{mem['gpus_needed']['note']}]")
    cl = p.get("cluster")
    if cl:
        lines.append(f"what the autoscaler would launch on {cl['cluster_config']}:")
        for stage, s in cl["stages"].items():
            ask = ", ".join(f"{k} {v:g}" for k, v in s["per_worker"].items())
            nodes = s["launches"] if isinstance(s["launches"], str) else ", ".join(
                f"{n} × {t}" for t, n in s["launches"].items()) or "nothing"
            lines.append(f"  {stage:<20} {s['workers']:>5} workers of {{{ask}}} → {nodes}")
    lines.append("rates:")
    for k, v in p["rates"].items():
        lines.append(f"  {k} = {v['value']:g} [{v['basis']}]" + (f" ({v['note']})" if v["note"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_plan(worked_example()))
