"""Control plane at scale: no-op shard tasks through the download stage's scheduler on a local Ray cluster.

    python benchmarks/bench_scheduler.py [--tasks 30000] [--pairs 5] [--max-in-flight 256] [--nodes 2] [--sweep 0]

The cluster is real and multi-node (``ray.cluster_utils.Cluster``: a head with no CPUs, the way cluster/config.yaml
runs it, plus ``--nodes`` worker raylets of one CPU each), so every task goes through the GCS, a raylet's
scheduler and a worker process. Each measured run is its own driver process joining that cluster, so its memory
figures start from a clean process:

- **ours**: ``pipeline.runtime.ray_seam.run_bounded`` (what ``run_download`` runs shards with): items read lazily, at
  most ``--max-in-flight`` refs outstanding, each result handed on as it lands and dropped.
- **peer**: the usual glue-script shape, ``ray.get([task.remote(i) for i in range(n)])``: every ref (and then every
  result) held by the driver at once.

Both run the same no-op task (it returns a small manifest-like dict). Driver memory is the peak RSS of the driver
process (sampled every 20 ms) above its RSS just after joining; "bounded" means ours stays flat from 1/10 of the
tasks to all of them while the peer grows with the count. ``--sweep`` tasks per in-flight cap show what the cap costs
in tasks/s.

Headline: ours/peer tasks/s, the median over ``--pairs`` alternated pairs (order flipped each pair), min and max
beside it. Goal ≥ 0.9: bounding the refs in flight may cost at most 10 % of the throughput of holding them all.
Second goal: driver memory bounded, ours' growth at ``--tasks`` at most 1.5× its growth at a tenth of them (+ 20 MB
of slack for the allocator). Writes benchmarks/results/scheduler.json and prints it as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._results import alternate, headline, machine_state, write_result  # noqa: E402


def _driver(address: str, mode: str, n: int, cap: int) -> dict[str, Any]:
    """One measured run, in this (fresh) process: join the cluster, schedule ``n`` no-op tasks, report."""
    import psutil
    import ray

    from pipeline.runtime import ray_seam

    ray.init(address=address, configure_logging=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    def shard(i: int) -> dict[str, int]:
        return {"shard_id": i, "count": 0, "successes": 0}

    ray.get([shard.remote(i) for i in range(200)])  # workers started and warm on every node before timing
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    seen = [0, 0]  # results, sum of shard ids: every task's result arrived once
    t0 = time.perf_counter()
    if mode == "ours":
        def done(_: int, m: dict[str, int]) -> None:
            seen[0] += 1
            seen[1] += m["shard_id"]

        stats = ray_seam.run_bounded(lambda i, attempt: shard.remote(i), range(n), cap, 0, done,
                                     lambda i, e: None)
    else:
        results = ray.get([shard.remote(i) for i in range(n)])
        seen = [len(results), sum(m["shard_id"] for m in results)]
        stats = {"peak_in_flight": n}
    seconds = time.perf_counter() - t0
    stop.set()
    peak[0] = max(peak[0], proc.memory_info().rss)
    assert seen == [n, n * (n - 1) // 2], f"{mode}: results lost or repeated: {seen}"
    return {"mode": mode, "tasks": n, "max_in_flight": cap if mode == "ours" else None, "seconds": round(seconds, 2),
            "tasks_per_s": round(n / seconds, 1), "driver_rss_base_mb": round(base / 2**20, 1),
            "driver_rss_growth_mb": round((peak[0] - base) / 2**20, 1), "peak_in_flight": stats["peak_in_flight"]}


def _run(address: str, mode: str, n: int, cap: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--driver", mode, "--address", address, "--tasks", str(n),
                          "--max-in-flight", str(cap)], capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} driver failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[bench] {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


GOAL_RATIO = 0.9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=30_000, help="tasks per measured run (each run >= 20 s here)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--max-in-flight", type=int, default=256)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--sweep", type=int, default=0, help="tasks per in-flight cap in the sweep (0: none)")
    ap.add_argument("--driver", choices=["ours", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        print(json.dumps(_driver(args.address, args.driver, args.tasks, args.max_in_flight)))
        return

    from ray.cluster_utils import Cluster

    state = machine_state()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only benchmark cluster; no token handshake
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        tenth = _run(cluster.address, "ours", args.tasks // 10, args.max_in_flight)
        runs = alternate({"peer": lambda: _run(cluster.address, "peer", args.tasks, 0),
                          "ours": lambda: _run(cluster.address, "ours", args.tasks, args.max_in_flight)},
                         args.pairs, lambda a, b: b["tasks_per_s"] / a["tasks_per_s"])
        sweep = [_run(cluster.address, "ours", args.sweep, cap) for cap in (8, 64, 1024)] if args.sweep else []
    finally:
        cluster.shutdown()
    growth = max(p["ours"]["driver_rss_growth_mb"] for p in runs["pairs"])
    peer_growth = max(p["peer"]["driver_rss_growth_mb"] for p in runs["pairs"])
    bound = 1.5 * tenth["driver_rss_growth_mb"] + 20.0
    result = {
        "name": "scheduler",
        "headline": headline("scheduler_tasks_per_s_ours_over_unbounded_peer", runs["ratio"], GOAL_RATIO,
                             tasks=args.tasks, max_in_flight=args.max_in_flight,
                             basis="median over alternated pairs of ours/peer no-op tasks per second"),
        "goals": {"tasks_per_s_ratio": {"value": runs["ratio"]["median"], "goal": GOAL_RATIO,
                                        "met": runs["ratio"]["median"] >= GOAL_RATIO},
                  "driver_memory_bounded": {"ours_growth_mb": growth, "ours_tenth_growth_mb":
                                            tenth["driver_rss_growth_mb"], "bound_mb": round(bound, 1),
                                            "peer_growth_mb": peer_growth, "met": growth <= bound}},
        "previous_headline": {"value": None, "basis": "tasks/s printed with no goal; no committed result"},
        "runs": runs, "ours_tenth": tenth, "cap_sweep": sweep,
        "cluster": {"head_cpus": 0, "worker_nodes": args.nodes, "cpus_per_worker": 1},
        "machine": state,
    }
    write_result("scheduler", result)


if __name__ == "__main__":
    main()
