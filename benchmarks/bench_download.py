"""Our download stage (Ray tasks) vs the img2dataset CLI (multiprocessing distributor) on loopback servers.

    python benchmarks/bench_download.py [--case web|zero|all] [--images 10000] [--pairs 3] [--threads 32]
                                        [--protocols http,https] [--quick] [--pipeline-root DIR]

Two cases (servers and image sets in ``benchmarks/_download_server.py``):

- **web** (the default): a server that answers like the web — lognormal latency (median 100 ms, 3 % of URLs 10x
  slower), one round trip per new connection (two over TLS), 150 hosts of which 10 CDN-like ones carry 60 % of the
  URLs, a LAION-like JPEG/PNG/WebP mix (shorter side 150-1,500 px, median ~450), every URL distinct bytes — over plain
  HTTP and over HTTPS with a CA made for the run (ours trusts it through ``download.ca_bundle``, img2dataset through
  ``SSL_CERT_FILE``, which its urllib reads).
- **zero**: the original case, ~1024x768 JPEGs with no latency over HTTP/1.0; its headline is the phase ratio.

Both tools get the same URL list (parquet), the same connections in flight (img2dataset: one process per core with
``--threads`` threads; ours: ``--tasks-per-core`` shard tasks per core with ``--threads / N`` threads each) and resize
settings (center_crop to ``--image-size``, jpg 95, sha256 of every body, no EXIF). Ours runs its own local Ray with
its workers at the benchmark's priority (``RAY_worker_niceness=0``; Ray renices workers +15 by default, which on a
machine shared with other work would leave our workers at nice 19 against img2dataset's processes). Runs alternate in
pairs with the order flipped each pair, fresh output folders; every ratio is taken pair by pair and reported as
median, min and max. For each run:

- **whole command**: wall time of the CLI process, launch to exit (what a user waits for);
- **phase**: first shard start → last shard end, from the per-shard ``*_stats.json`` (fixed start/end costs left out);
- **CPU seconds per image**: user + system CPU of the tool's whole process tree (this process is a child subreaper,
  so every descendant — Ray's raylet, GCS, workers; img2dataset's pool — is reaped here and counted, however short it
  lived, and none of the machine's other work is), divided by the images the tool kept. The server's CPU is
  measured on its own and not counted for either tool;
- **fraction of the CPU limit**: phase images/s over (the tool's own per-image image work on one core — our
  ``ImageProcessor``, img2dataset's ``Resizer`` — times the CPU limit, the affinity mask capped by the cgroup
  quota); and the machine's busy fraction during the run, split into the tool, the server and everything else.

Writes benchmarks/results/download.json (a case not run this time keeps its previous section) and prints it last.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import _download_server as servers
import cv2
import numpy as np
import psutil
from _results import RESULTS, write_result  # benchmarks/ is sys.path[0] when run as a script
from _tool_meter import (
    TreeCpu,
    background_busy,
    become_subreaper,
    cpu_limit_cores,
    machine_cpu,
    machine_info,
    proc_cpu_s,
    settle,
    subprocess_env,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MIN_SUCCESS = 0.99
SUBPROCESS_TIMEOUT_S = 900
GOALS = {"web_whole_command": 1.5, "web_cpu_per_image": 1.3, "zero_phase": 1.5}


class BenchError(RuntimeError):
    """A run produced no usable measurement; the message says which tool and why."""


# ------------------------------------------------------------------------------------------------------------ runs


def read_stats(folder: str, committed_only: bool) -> dict[str, Any]:
    """Sum the per-shard ``*_stats.json``; phase = earliest start_time → latest end_time (None if keys missing)."""
    stats = []
    for path in sorted(glob.glob(os.path.join(folder, "*_stats.json"))):
        shard = os.path.basename(path)[: -len("_stats.json")]
        if committed_only and not os.path.isfile(os.path.join(folder, f"{shard}.done.json")):
            continue
        stats.append(json.load(open(path)))
    out: dict[str, Any] = {"shards": len(stats), "count": sum(s.get("count", 0) for s in stats),
                           "successes": sum(s.get("successes", 0) for s in stats)}
    errors: dict[str, int] = {}
    for s in stats:
        for k, v in (s.get("status_dict") or {}).items():
            if k not in ("success", "ok"):
                errors[k] = errors.get(k, 0) + v
    out["errors"] = errors
    if stats and all("start_time" in s and "end_time" in s for s in stats):
        out["phase_start"] = min(s["start_time"] for s in stats)
        out["phase_end"] = max(s["end_time"] for s in stats)
        out["phase_s"] = out["phase_end"] - out["phase_start"]
    else:
        out["phase_s"] = None
    return out


def _clean(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def run_tool(name: str, cmd: list[str], env: dict[str, str], stats_dir: str, committed_only: bool, log_path: str,
             expected: int, server_pid: int, cwd: str = ROOT) -> dict[str, Any]:
    keep = {p.pid for p in psutil.Process().children(recursive=True)}  # the server and whatever was there before
    meter = TreeCpu(name)
    srv0, (busy0, total0) = proc_cpu_s(server_pid), machine_cpu()
    meter.start(keep)
    t_launch = time.time()
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(env), stdout=subprocess.PIPE, stderr=log,
                                      text=True, timeout=SUBPROCESS_TIMEOUT_S, preexec_fn=meter.preexec)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"{name}: timed out after {SUBPROCESS_TIMEOUT_S} s; log {log_path}") from exc
        wall = time.perf_counter() - t0
        settle_s = settle(keep, meter)
        tool_cpu, srv1, (busy1, total1) = meter.seconds(), proc_cpu_s(server_pid), machine_cpu()
    finally:
        meter.close()
    if proc.returncode != 0:
        raise BenchError(f"{name}: exit status {proc.returncode}\n--- stderr tail ---\n"
                         f"{_clean(open(log_path, errors='replace').read()[-2500:])}")
    st = read_stats(stats_dir, committed_only)
    if st["successes"] < MIN_SUCCESS * expected:
        raise BenchError(f"{name}: only {st['successes']}/{expected} images succeeded (errors {st['errors']}); "
                         f"log {log_path}: {_clean(open(log_path, errors='replace').read()[-1500:])}")
    server_cpu = (srv1 - srv0) if srv0 is not None and srv1 is not None else 0.0
    span = total1 - total0
    result: dict[str, Any] = {
        "wall_s": round(wall, 2), "wall_images_per_s": round(st["successes"] / wall, 1), **st,
        "tool_cpu_s": round(tool_cpu, 2), "cpu_ms_per_image": round(1e3 * tool_cpu / st["successes"], 3),
        "server_cpu_s": round(server_cpu, 2), "settle_s": round(settle_s, 2), "cpu_meter": meter.kind,
        "machine_busy_fraction": round((busy1 - busy0) / span, 3) if span > 0 else None,
        "other_busy_fraction": round(max(0.0, busy1 - busy0 - tool_cpu - server_cpu) / span, 3) if span > 0 else None,
    }
    if st["phase_s"]:
        result["phase_s"] = round(st["phase_s"], 2)
        result["phase_images_per_s"] = round(st["successes"] / st["phase_s"], 1)
        result["startup_s"] = round(st["phase_start"] - t_launch, 2)  # launch → first shard starts downloading
        result["teardown_s"] = round(t_launch + wall - st["phase_end"], 2)
    else:
        result["phase_images_per_s"] = None
    for k in ("phase_start", "phase_end"):
        result.pop(k, None)
    shutil.rmtree(os.path.dirname(stats_dir) if name == "ours" else stats_dir, ignore_errors=True)
    return result


def img2dataset_cmd(url_list: str, out: str, cores: int, threads: int, image_size: int, shard_size: int) -> list[str]:
    exe = os.path.join(ROOT, ".venv", "bin", "img2dataset")
    exe = exe if os.path.isfile(exe) else (shutil.which("img2dataset") or "img2dataset")
    return [exe, "--url_list", url_list, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
            "--output_format", "webdataset", "--output_folder", out, "--processes_count", str(cores),
            "--thread_count", str(threads), "--image_size", str(image_size),
            "--resize_mode", "center_crop", "--encode_format", "jpg", "--encode_quality", "95",
            "--number_sample_per_shard", str(shard_size), "--distributor", "multiprocessing",
            "--timeout", "10", "--retries", "0", "--enable_wandb", "False",
            # ours does not extract EXIF (img2dataset's default does); the same work on both sides:
            "--extract_exif", "False", "--compute_hash", "sha256"]


def python_exe() -> str:
    py = os.path.join(ROOT, ".venv", "bin", "python")
    return py if os.path.isfile(py) else sys.executable


def config_keys(root: str) -> tuple[set[str], set[str]]:
    """Top-level and ``download.*`` keys that ``root``'s config accepts (an older checkout may lack new ones)."""
    code = ("import dataclasses, json; from pipeline.config import Config, DownloadConfig; "
            "print(json.dumps([[f.name for f in dataclasses.fields(c)] for c in (Config, DownloadConfig)]))")
    proc = subprocess.run([python_exe(), "-c", code], cwd=root, env=subprocess_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"ours: cannot read pipeline/config in {root}:\n{proc.stderr[-2000:]}")
    top, dl = json.loads(proc.stdout.strip().splitlines()[-1])
    return set(top), set(dl)


def ours_run(root: str, keys: tuple[set[str], set[str]], tmp: str, tag: str, download: dict[str, Any],
             cores: int, ca: str | None) -> tuple[list[str], dict[str, str], str]:
    """(command, extra env, stats folder) for one run of ours; the CA goes through ``download.ca_bundle`` when the
    checkout knows that key, else through SSL_CERT_FILE (which ssl's default context reads)."""
    import yaml

    top, known = keys
    run_dir = os.path.join(tmp, f"ours_{tag}")
    download = dict(download, allow_private_addresses=True)  # a loopback server
    download.setdefault("max_in_flight", cores)
    # Its own Ray (never joins a cluster another `ray start` left running), and its workers at this process's priority
    # like img2dataset's pool processes: Ray renices workers by +15 by default, which on a machine shared with other
    # work starves the tool's workers and the benchmark would measure the neighbours, not the tool.
    env = {"RAY_TMPDIR": os.path.join(tmp, "ray"), "RAY_worker_niceness": "0"}
    if ca and "ca_bundle" in known:
        download["ca_bundle"] = ca
    elif ca:
        env["SSL_CERT_FILE"] = ca
    cfg = {"run_dir": run_dir, "seed": 0, "num_cpus": cores, "download": {k: v for k, v in download.items()
                                                                          if k in known}}
    path = os.path.join(tmp, f"ours_{tag}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({k: v for k, v in cfg.items() if k in top}, f, sort_keys=False)
    return [python_exe(), "-m", "pipeline", "download", "--config", path], env, os.path.join(run_dir, "images")


def _stat(xs: list[float | None]) -> dict[str, float] | None:
    vals = [x for x in xs if x is not None]
    if not vals or len(vals) != len(xs):
        return None
    return {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3), "max": round(max(vals), 3)}


def run_pairs(pairs: int, tools: dict[str, Any], label: str) -> dict[str, Any]:
    """``pairs`` A/B pairs, the order flipped each pair; per-pair ratios (ours better when > 1); their spread."""
    runs: list[dict[str, Any]] = []
    for k in range(pairs):
        order = ["img2dataset", "ours"] if k % 2 == 0 else ["ours", "img2dataset"]
        pair: dict[str, Any] = {"order": order}
        runs.append(pair)
        for tool in order:
            pair[tool] = tools[tool](k)
            print(f"[bench] {label} pair {k}: {tool:<11} {_fmt(pair[tool])}", flush=True)
        i2d, ours = pair["img2dataset"], pair["ours"]
        pair["whole_command_ratio"] = round(i2d["wall_s"] / ours["wall_s"] * ours["successes"] / i2d["successes"], 3)
        pair["phase_ratio"] = (round(ours["phase_images_per_s"] / i2d["phase_images_per_s"], 3)
                               if ours["phase_images_per_s"] and i2d["phase_images_per_s"] else None)
        pair["cpu_per_image_ratio"] = round(i2d["cpu_ms_per_image"] / ours["cpu_ms_per_image"], 3)
        print(f"[bench] {label} pair {k}: img2dataset/ours whole {pair['whole_command_ratio']:.2f}x, phase "
              f"{pair['phase_ratio'] or 0:.2f}x, CPU/image {pair['cpu_per_image_ratio']:.2f}x", flush=True)
    out: dict[str, Any] = {"pairs": runs}
    for k in ("whole_command_ratio", "phase_ratio", "cpu_per_image_ratio"):
        out[k] = _stat([p[k] for p in runs])
    for tool in ("img2dataset", "ours"):
        out[tool] = {k: _stat([p[tool].get(k) for p in runs]) for k in (
            "wall_s", "phase_s", "phase_images_per_s", "startup_s", "teardown_s", "tool_cpu_s", "cpu_ms_per_image",
            "server_cpu_s", "machine_busy_fraction", "other_busy_fraction")}
    return out


def _fmt(r: dict[str, Any]) -> str:
    phase = f"phase {r['phase_s']:.1f}s = {r['phase_images_per_s']:.0f} img/s" if r.get("phase_s") else "phase n/a"
    return (f"{r['successes']}/{r['count']} ok, whole {r['wall_s']:.1f}s, {phase}, "
            f"start-up {r.get('startup_s', 0):.1f}s, teardown {r.get('teardown_s', 0):.1f}s, "
            f"CPU {r['tool_cpu_s']:.1f}s = {r['cpu_ms_per_image']:.2f} ms/img "
            f"(server {r['server_cpu_s']:.1f}s, others {r['other_busy_fraction']:.0%} busy)")


# -------------------------------------------------------------------------------------------- per-image CPU limits


def image_work_rates(blobs: list[bytes], size: int, passes: int = 2) -> dict[str, Any]:
    """Single-core images/s of each tool's per-image image work on these bodies: our ``ImageProcessor`` (header
    checks, decode, crop, resize, encode jpg 95) and img2dataset's ``Resizer`` (its decode, resize, crop, encode)."""
    from img2dataset.resizer import Resizer

    from pipeline.download.imaging import ImageLimits, ImageProcessor

    cv2.setNumThreads(1)
    ours = ImageProcessor(size, "center_crop", "jpg", 95, ImageLimits())
    theirs = Resizer(image_size=size, resize_mode="center_crop", resize_only_if_bigger=False, encode_quality=95)
    work = {"ours": lambda b: ours(b), "img2dataset": lambda b: theirs(io.BytesIO(b))}
    out: dict[str, Any] = {"images": len(blobs)}
    for name, fn in work.items():
        for b in blobs[:10]:
            fn(b)
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            for b in blobs:
                fn(b)
            best = min(best, time.perf_counter() - t0)
        out[name] = {"images_per_s": round(len(blobs) / best, 1), "ms_per_image": round(1e3 * best / len(blobs), 3)}
    return out


def _limits(rates: dict[str, Any], limit_cores: float) -> dict[str, float]:
    return {t: round(rates[t]["images_per_s"] * limit_cores, 1) for t in ("ours", "img2dataset")}


# ------------------------------------------------------------------------------------------------------- the cases


def ours_settings(url_list: str, shard_size: int, image_size: int, threads: int) -> dict[str, Any]:
    """Our ``download:`` keys for the resize and encode settings both tools get (center_crop, jpg 95, no retries)."""
    return {"input": url_list, "shard_size": shard_size, "image_size": image_size, "resize_mode": "center_crop",
            "output_format": "webdataset", "encode_format": "jpg", "encode_quality": 95, "thread_count": threads,
            "timeout": 10, "retries": 0}


def write_url_list(path: str, urls: list[str]) -> None:
    import pandas as pd

    pd.DataFrame({"url": urls, "caption": [f"synthetic image {i}" for i in range(len(urls))]}).to_parquet(
        path, index=False)


def web_case(args: argparse.Namespace, cores: int, limit_cores: float, tmp: str) -> dict[str, Any]:
    profile = servers.WebProfile(median_ms=args.latency_ms, slow_fraction=args.slow_fraction, rtt_ms=args.rtt_ms,
                                 hosts=args.hosts)
    folder, manifest = servers.image_set(args.bases, cores)
    print(f"[bench] web: {args.bases} base images ({'cached' if manifest['cached'] else 'generated'}; formats "
          f"{manifest['formats']}, short side {manifest['short_side_px']}, bytes {manifest['bytes']})", flush=True)
    blobs = [open(os.path.join(folder, f"{i}.{e['fmt']}"), "rb").read() for i, e in enumerate(manifest["images"])]
    rates = image_work_rates(blobs, args.image_size)
    lat = servers.latencies(args.images, profile)
    tls = servers.make_ca(os.path.join(tmp, "tls"), ["localhost"], ["127.0.0.1"])
    section: dict[str, Any] = {
        "parameters": {"images": args.images, "pairs": args.pairs, "threads": args.threads, "processes": cores,
                       "ours_tasks": {"in_flight": cores * args.tasks_per_core,
                                      "threads_each": args.threads // args.tasks_per_core,
                                      "task_cpus": 1 / args.tasks_per_core,
                                      "node_connections": args.threads * cores if args.node_budget else 0},
                       "shard_size": args.shard_size, "image_size": args.image_size, "resize_mode": "center_crop",
                       "encode": "jpg 95", "profile": profile.__dict__, "protocols": args.protocols,
                       "latency_s": {"median": round(float(np.median(lat)), 3), "mean": round(float(lat.mean()), 3),
                                     "p99": round(float(np.quantile(lat, 0.99)), 3)},
                       "image_set": {k: v for k, v in manifest.items() if k != "images"},
                       "dns": "hosts are 127.0.0.1 ports: no DNS lookups on either side",
                       "priority": "both tools' workers at the benchmark's own niceness (ours: RAY_worker_niceness=0; "
                                   "Ray's default renices workers +15)"},
        "single_core_image_work": rates,
        "cpu_limit_images_per_s": _limits(rates, limit_cores),
        "latency_limit_images_per_s": round(args.threads * cores / float(lat.mean()), 1),
    }
    proc, pipe, ports = servers.start(folder, manifest, args.images, profile, tls)
    try:
        root = os.path.abspath(args.pipeline_root)
        keys = config_keys(root)
        subprocess.run([python_exe(), "-c", "import img2dataset, ray, pipeline.cli"], cwd=root, env=subprocess_env(),
                       capture_output=True)  # one untimed import of both tools: a warm page cache for both
        for scheme in args.protocols:
            url_list = os.path.join(tmp, f"web_{scheme}.parquet")
            write_url_list(url_list, servers.urls(args.images, profile, ports[scheme], scheme, manifest))
            ca = tls["ca"] if scheme == "https" else None
            per = args.tasks_per_core  # the same connections in flight: per-core tasks x threads each
            download = {**ours_settings(url_list, args.shard_size, args.image_size, args.threads // per),
                        "max_in_flight": cores * per, "task_cpus": 1 / per}
            if args.node_budget:  # the same connections in flight, shared by the node's tasks instead of split
                download["node_connections"] = args.threads * cores

            def i2d(k: int, scheme: str = scheme, url_list: str = url_list, ca: str | None = ca) -> dict[str, Any]:
                out = os.path.join(tmp, f"i2d_{scheme}_{k}")
                before = servers.counts(pipe)
                r = run_tool("img2dataset", img2dataset_cmd(url_list, out, cores, args.threads, args.image_size,
                                                            args.shard_size), {"SSL_CERT_FILE": ca} if ca else {},
                             out, False, out + ".log", args.images, proc.pid)
                return _with_counts(r, before, servers.counts(pipe))

            def ours(k: int, scheme: str = scheme, download: dict = download, ca: str | None = ca) -> dict[str, Any]:
                cmd, env, stats = ours_run(root, keys, tmp, f"{scheme}_{k}", download, cores, ca)
                before = servers.counts(pipe)
                log = os.path.dirname(stats) + ".log"
                r = run_tool("ours", cmd, env, stats, True, log, args.images, proc.pid, root)
                return _with_counts(r, before, servers.counts(pipe))

            section[scheme] = run_pairs(args.pairs, {"img2dataset": i2d, "ours": ours}, f"web {scheme}")
            for tool in ("img2dataset", "ours"):
                ips = section[scheme][tool]["phase_images_per_s"]
                if ips:
                    section[scheme][tool]["cpu_limit_fraction"] = round(
                        ips["median"] / section["cpu_limit_images_per_s"][tool], 3)
    finally:
        proc.terminate()
        proc.join(10)
    return section


def _with_counts(r: dict[str, Any], before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Connections and requests the server saw during the run (keep-alive shows as fewer connections)."""
    r["server_connections"] = after.get("connections", 0) - before.get("connections", 0)
    r["server_requests"] = after.get("requests", 0) - before.get("requests", 0)
    return r


def zero_case(args: argparse.Namespace, cores: int, limit_cores: float, tmp: str) -> dict[str, Any]:
    n = args.zero_images
    folder, manifest = servers.zero_image_set(n, cores)
    print(f"[bench] zero: {n} images in {folder} ({'cached' if manifest['cached'] else 'generated'})", flush=True)
    blobs = [open(os.path.join(folder, f"{i}.jpg"), "rb").read() for i in range(min(200, n))]
    rates = image_work_rates(blobs, args.image_size)
    section: dict[str, Any] = {
        "parameters": {"images": n, "pairs": args.zero_pairs, "threads": args.zero_threads, "processes": cores,
                       "shard_size": args.zero_shard_size, "image_size": args.image_size,
                       "source_images": {k: manifest[k] for k in ("width", "height", "quality", "bytes_min",
                                                                  "bytes_median", "bytes_max", "bytes_total")}},
        "single_core_image_work": rates,
        "cpu_limit_images_per_s": _limits(rates, limit_cores),
    }
    proc, port = servers.start_zero(folder, n)
    try:
        root = os.path.abspath(args.pipeline_root)
        keys = config_keys(root)
        url_list = os.path.join(tmp, "zero.parquet")
        write_url_list(url_list, [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(n)])
        download = ours_settings(url_list, args.zero_shard_size, args.image_size, args.zero_threads)

        def i2d(k: int) -> dict[str, Any]:
            out = os.path.join(tmp, f"i2d_zero_{k}")
            return run_tool("img2dataset", img2dataset_cmd(url_list, out, cores, args.zero_threads, args.image_size,
                                                           args.zero_shard_size), {}, out, False, out + ".log", n,
                            proc.pid)

        def ours(k: int) -> dict[str, Any]:
            cmd, env, stats = ours_run(root, keys, tmp, f"zero_{k}", download, cores, None)
            return run_tool("ours", cmd, env, stats, True, os.path.dirname(stats) + ".log", n, proc.pid, root)

        section.update(run_pairs(args.zero_pairs, {"img2dataset": i2d, "ours": ours}, "zero"))
    finally:
        proc.terminate()
        proc.join(10)
    return section


# ------------------------------------------------------------------------------------------------------------ main


def headline(cases: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The headline (the web case's whole-command ratio, its worse protocol) and every goal with its figure."""
    goals: dict[str, Any] = {}
    web = cases.get("web") or {}
    for scheme in ("http", "https"):
        sec = web.get(scheme)
        if not sec:
            continue
        for key, goal in (("whole_command_ratio", GOALS["web_whole_command"]),
                          ("cpu_per_image_ratio", GOALS["web_cpu_per_image"])):
            med = (sec.get(key) or {}).get("median")
            goals[f"web_{scheme}_{key}"] = {"value": med, "goal": goal, "met": med is not None and med >= goal}
    zero = cases.get("zero") or {}
    if zero.get("phase_ratio"):
        med = zero["phase_ratio"]["median"]
        goals["zero_phase_ratio"] = {"value": med, "goal": GOALS["zero_phase"], "met": med >= GOALS["zero_phase"]}
        whole = (zero.get("whole_command_ratio") or {}).get("median")
        goals["zero_whole_command_ratio"] = {"value": whole, "goal": None, "met": None}
    whole = [g["value"] for k, g in goals.items() if k.startswith("web_") and k.endswith("whole_command_ratio")]
    head = {"name": "download_web_whole_command_speedup_vs_img2dataset",
            "value": min(whole) if whole and None not in whole else None, "goal": GOALS["web_whole_command"],
            "higher_is_better": True,
            "basis": "web case: median over alternated pairs of img2dataset whole-command time / ours (per image "
                     "kept), the worse of HTTP and HTTPS; every goal in `goals`"}
    return head, goals


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("web", "zero", "all"), default="web")
    ap.add_argument("--images", type=int, default=10_000, help="web: URLs per run")
    ap.add_argument("--pairs", type=int, default=3, help="web: alternated pairs per protocol")
    ap.add_argument("--threads", type=int, default=32, help="web: download threads per process / task")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--protocols", default="http,https")
    ap.add_argument("--bases", type=int, default=300, help="web: distinct base pictures")
    ap.add_argument("--latency-ms", type=float, default=100.0, help="web: median response latency")
    ap.add_argument("--slow-fraction", type=float, default=0.03, help="web: URLs answered 10x slower")
    ap.add_argument("--rtt-ms", type=float, default=25.0, help="web: round trip paid per new connection (2x on TLS)")
    ap.add_argument("--hosts", type=int, default=150)
    ap.add_argument("--tasks-per-core", type=int, default=2,
                    help="web: ours runs this many shard tasks per core with threads/N threads each (download."
                         "task_cpus = 1/N): the same connections in flight as img2dataset's one process per core")
    ap.add_argument("--no-node-budget", dest="node_budget", action="store_false",
                    help="web: ours splits the connections per task (threads/N each) instead of sharing one budget "
                         "of threads x cores per node (download.node_connections)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--zero-images", type=int, default=2000)
    ap.add_argument("--zero-pairs", type=int, default=3)
    ap.add_argument("--zero-threads", type=int, default=16)
    ap.add_argument("--zero-shard-size", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="smoke run: 600 URLs, 1 pair, shards of 100")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    ap.add_argument("--label", default="", help="stored as cases['<case><label>'] (e.g. _before for an older checkout "
                                                "given by --pipeline-root); the headline reads the unlabelled cases")
    ap.add_argument("--pipeline-root", default=ROOT,
                    help="checkout whose `python -m pipeline download` is measured (default: this one)")
    args = ap.parse_args()
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if args.quick:
        args.images, args.pairs, args.shard_size = 600, 1, 100
        args.zero_images, args.zero_pairs, args.zero_shard_size = 200, 1, 50
    return args


def main() -> None:
    args = parse_args()
    os.environ.update(NO_ALBUMENTATIONS_UPDATE="1", no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    limit_cores = cpu_limit_cores()
    cores = max(1, int(limit_cores))
    t_start = time.perf_counter()
    idle_busy = background_busy()
    if idle_busy > 0.1:
        print(f"[bench] WARNING: {idle_busy:.0%} of the CPU is busy before the benchmark starts; other work on this "
              f"machine will skew the wall times (CPU seconds per image are counted per tool)", file=sys.stderr,
              flush=True)
    previous: dict[str, Any] = {}
    try:
        previous = json.load(open(os.path.join(RESULTS, "download.json"))).get("cases", {})
    except (OSError, ValueError, AttributeError):
        pass
    result: dict[str, Any] = {"headline": {}, "goals": {}, "machine": machine_info(limit_cores, idle_busy),
                              "subreaper": become_subreaper(), "cases": dict(previous)}
    tmp = tempfile.mkdtemp(prefix="bench_download_")
    try:
        for case, fn in (("zero", zero_case), ("web", web_case)):
            if args.case in (case, "all"):
                t0 = time.perf_counter()
                name = case + args.label
                result["cases"][name] = fn(args, cores, limit_cores, tmp)
                result["cases"][name].update(measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"), quick=args.quick,
                                             pipeline_root=os.path.abspath(args.pipeline_root),
                                             case_s=round(time.perf_counter() - t0, 1))
    except BenchError as exc:
        result["error"] = str(exc)
        print(f"[bench] FAILED: {exc}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result["headline"], result["goals"] = headline(result["cases"])
    result["bench_s"] = round(time.perf_counter() - t_start, 1)
    write_result("download", result)
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
