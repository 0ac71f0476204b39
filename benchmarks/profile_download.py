"""Where our download's CPU per image goes, on bench_download's web-like server: a sampling profile of every
Python process of one ``python -m pipeline download`` run (py-spy: the driver and each Ray worker), folded into the
parts a shard spends CPU on.

    python benchmarks/profile_download.py [--images 4000] [--protocol https] [--py-spy PATH]

py-spy is not a dependency (pip install py-spy). Samples are of running threads only (py-spy leaves idle ones out),
so the shares are of CPU, not of wall time. Each sample goes to the first category whose pattern matches a frame,
searched from the innermost frame out. Writes benchmarks/results/download_profile.json and prints it last.
"""

from __future__ import annotations

import argparse
import functools
import linecache
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import _download_server as servers
import bench_download as bench
import psutil
from _results import machine_state, write_result

# (category, regex), matched against the innermost frame first and outwards; a frame reads "function (file:line)
# source-of-that-line", so a category can name the call on the line (cv2.imdecode) as well as the file.
CATEGORIES = [
    ("image decode", r"imdecode|Image\.open|\.load\(\)|_theirs"),
    ("image resize, crop and matte", r"cv2\.resize|_resize|_matte|_geometry|cvtColor|copyMakeBorder"),
    ("image encode", r"imencode"),
    ("hashing (sha256 of every body)", r"hashlib|sha256|hexdigest"),
    ("tls (handshake, encrypt/decrypt)", r"\(ssl\.py|do_handshake|wrap_socket"),
    ("http parsing and socket I/O", r"http/client\.py|\(socket\.py|selectors\.py|connections\.py"),
    ("tar / parquet writing and commit", r"tarfile\.py|parquet|pyarrow|writer\.py|fsspec|commit\.py"),
    ("fetch guard, watchdog and bookkeeping", r"fetch\.py|owners\.py|shard\.py|imaging\.py"),
    ("python threads and queues", r"threading\.py|queue\.py|concurrent/futures"),
    ("python start-up and imports", r"<frozen importlib|importlib|\(site\.py|pkgutil|dataclasses\.py|_compile"),
    ("ray (driver, workers, dashboard, monitors)", r"\(ray/|_raylet|psutil"),
]
SOURCE_ROOTS = [bench.ROOT, *sys.path, os.path.dirname(os.__file__)]


@functools.cache  # a capture repeats the same frames thousands of times
def _source(frame: str) -> str:
    """``frame`` with the text of its source line appended (found under the repository, sys.path or the stdlib)."""
    m = re.search(r"\(([^()]+):(\d+)\)$", frame)
    if not m:
        return frame
    path, line = m.group(1), int(m.group(2))
    for base in SOURCE_ROOTS:
        full = path if os.path.isabs(path) else os.path.join(base, path)
        if os.path.exists(full):
            return f"{frame} {linecache.getline(full, line).strip()}"
    return frame


def fold(raw: str) -> tuple[Counter, int]:
    """Samples per category from py-spy's raw (collapsed) output: ``frame;frame;... count`` per line."""
    pats = [(name, re.compile(p)) for name, p in CATEGORIES]
    out, total = Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), [_source(f) for f in stack.split(";")]
        total += n
        name = next((c for f in reversed(frames) for c, p in pats if p.search(f)), "other")
        out[name] += n
    return out, total


def run_profiled(cmd: list[str], env: dict[str, str], cwd: str, py_spy: str, tmp: str) -> str:
    """Run ``cmd``; attach a py-spy recorder to it and to every Python process under it as it appears (Ray's
    workers are started by the raylet, which py-spy's --subprocesses does not follow); their stacks, concatenated."""
    log = open(os.path.join(tmp, "download.log"), "w+")  # noqa: SIM115 - read back on failure
    tool = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    spies: dict[int, tuple[subprocess.Popen, str]] = {}
    root = psutil.Process(tool.pid)
    while tool.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                # Ray starts a worker as setup_worker.py, which execs default_worker.py in the same process: a
                # recorder attached before the exec loses it, so wait for the worker's own command line.
                if (p.pid not in spies and "python" in os.path.basename(p.exe())
                        and "setup_worker.py" not in " ".join(p.cmdline())):
                    out = os.path.join(tmp, f"spy-{p.pid}.txt")
                    spies[p.pid] = (subprocess.Popen([py_spy, "record", "--pid", str(p.pid), "--rate", "50",
                                                      "--format", "raw", "--nonblocking", "--output", out],
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    if tool.wait() != 0:
        log.seek(0)
        sys.exit(f"the download failed ({tool.returncode}): {shlex.join(cmd)}\n{log.read()[-3000:]}")
    raw = []
    for spy, out in spies.values():
        spy.wait(timeout=60)
        if os.path.exists(out):
            with open(out) as f:
                raw.append(f.read())
    return "\n".join(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--protocol", choices=("http", "https"), default="https")
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--tasks-per-core", type=int, default=2)
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument("--raw", default="", help="also copy py-spy's collapsed stacks here")
    ap.add_argument("--fold", default="", help="fold a capture saved with --raw instead of running")
    args = ap.parse_args()
    if args.fold:
        with open(args.fold) as f:
            counts, total = fold(f.read())
        publish(counts, total, {"protocol": args.protocol, "images": args.images, "capture": args.fold,
                                "machine": "of the run that saved the capture (not recorded in it)"})
        return
    cores, state = len(os.sched_getaffinity(0)), machine_state()
    profile = servers.WebProfile()
    folder, manifest = servers.image_set(300, cores)
    tmp = tempfile.mkdtemp(prefix="profile-download-")
    tls = servers.make_ca(os.path.join(tmp, "tls"), ["localhost"], ["127.0.0.1"])
    proc, pipe, ports = servers.start(folder, manifest, args.images, profile, tls)
    try:
        url_list = os.path.join(tmp, "urls.parquet")
        bench.write_url_list(url_list, servers.urls(args.images, profile, ports[args.protocol], args.protocol,
                                                    manifest))
        per = args.tasks_per_core
        download = {**bench.ours_settings(url_list, 1000, 256, args.threads // per),
                    "max_in_flight": cores * per, "task_cpus": 1 / per}
        root = bench.ROOT
        cmd, env, _ = bench.ours_run(root, bench.config_keys(root), tmp, "profile", download, cores,
                                     tls["ca"] if args.protocol == "https" else None)
        raw = run_profiled(cmd, bench.subprocess_env(env), root, args.py_spy, tmp)
        counts, total = fold(raw)
        if args.raw:
            with open(args.raw, "w") as f:
                f.write(raw)
    finally:
        proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    publish(counts, total, {"protocol": args.protocol, "images": args.images, "machine": state})


def publish(counts: Counter, total: int, about: dict[str, Any]) -> None:
    shares = {k: round(v / total, 3) for k, v in counts.most_common()}
    result: dict[str, Any] = {
        "headline": {"name": "download_cpu_share_image_work", "higher_is_better": True, "goal": None,
                     "value": round(sum(v for k, v in shares.items() if k.startswith("image")), 3)},
        **about, "samples": total, "rate_hz": 50, "shares": shares, "categories": dict(CATEGORIES)}
    write_result("download_profile", result)


if __name__ == "__main__":
    main()
