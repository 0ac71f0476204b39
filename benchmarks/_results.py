"""The one way a benchmark publishes: ``benchmarks/results/<name>.json``, and the same JSON as its last stdout line.

Also what every A/B benchmark shares, so each one's headline follows the same rules:

- ``machine_state``: the machine it ran on and how busy it was at the start (load average, the CPU other processes
  used over one second); ``busy`` flags a run whose timings other work may have skewed.
- ``alternate``: A/B runs alternated in pairs, the order flipped each pair, one ratio per pair; ``ratio_summary``
  gives their median with min and max beside it (the headline is the median of per-pair ratios, never a best case).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIN_PAIRS = 5
MIN_RUN_S = 20.0


def write_result(name: str, result: dict[str, Any]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return path


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [float(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
    return sum(vals) - idle, sum(vals)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_state(sample_s: float = 1.0) -> dict[str, Any]:
    """The machine and its load now (call it before the first timed run). ``busy``: the 1-minute load average is
    above half the cores, or other processes used more than 30 % of the CPU over ``sample_s``."""
    cores = os.cpu_count() or 1
    busy0, total0 = _cpu_times()
    time.sleep(sample_s)
    busy1, total1 = _cpu_times()
    frac = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    load = os.getloadavg()
    busy = load[0] > 0.5 * cores or frac > 0.3
    out = {"cores": cores, "cpu": _cpu_model(), "python": platform.python_version(), "platform": platform.platform(),
           "loadavg_at_start": [round(x, 2) for x in load], "busy_fraction_at_start": round(frac, 3),
           "busy": busy}
    if busy:
        print(f"[bench] WARNING: the machine is busy at the start (load {load[0]:.1f} on {cores} cores, "
              f"{frac:.0%} CPU used by others): timings may be skewed", flush=True)
    return out


def ratio_summary(ratios: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(ratios), 4), "min": round(min(ratios), 4),
            "max": round(max(ratios), 4), "pairs": len(ratios)}


def alternate(runs: dict[str, Callable[[], dict[str, Any]]], pairs: int, ratio: Callable[[dict, dict], float],
              label: str = "") -> dict[str, Any]:
    """``pairs`` pairs of the two ``runs`` (name → a callable returning at least ``seconds``), A first in even
    pairs and B first in odd ones; ``ratio(a, b)`` of each pair (> 1: B better), and their summary."""
    (a_name, a), (b_name, b) = runs.items()
    out: list[dict[str, Any]] = []
    for k in range(pairs):
        order = [a_name, b_name] if k % 2 == 0 else [b_name, a_name]
        pair: dict[str, Any] = {"order": order}
        for name in order:
            pair[name] = (a if name == a_name else b)()
            print(f"[bench] {label}pair {k} {name}: {pair[name].get('seconds', 0):.1f}s", flush=True)
        pair["ratio"] = round(ratio(pair[a_name], pair[b_name]), 4)
        print(f"[bench] {label}pair {k}: ratio {pair['ratio']:.3f}", flush=True)
        out.append(pair)
    short = [p[n]["seconds"] for p in out for n in (a_name, b_name) if p[n].get("seconds", 0) < MIN_RUN_S]
    return {"pairs": out, "ratio": ratio_summary([p["ratio"] for p in out]),
            "runs_shorter_than_min_s": len(short), "min_run_s": MIN_RUN_S}


def headline(name: str, summary: dict[str, Any], goal: float | None, higher_is_better: bool = True,
             **extra: Any) -> dict[str, Any]:
    """The headline object: the median of per-pair ratios, with min and max beside it."""
    return {"name": name, "value": summary["median"], "min": summary["min"], "max": summary["max"],
            "pairs": summary["pairs"], "goal": goal, "higher_is_better": higher_is_better,
            "met": None if goal is None else (summary["median"] >= goal if higher_is_better
                                              else summary["median"] <= goal), **extra}
