"""What bench_download measures about the machine and about each tool's run: the CPU model and limit (affinity mask
capped by the cgroup quota), how busy the machine is besides the run, and the CPU seconds of one command's whole
process tree (its own cgroup where one can be made, else sampling every descendant; this process a subreaper so
Ray's daemons that outlive the CLI stay countable)."""

from __future__ import annotations

import ctypes
import os
import platform
import time
from importlib import metadata
from typing import Any

import cv2
import numpy as np
import psutil

# ---------------------------------------------------------------------------------------------------------- machine


def cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max or v1 cfs quota); None when unlimited or unknown."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpu_limit_cores() -> float:
    """Usable CPUs: the affinity mask (or cpu_count), capped by the cgroup quota."""
    try:
        cores: float = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return min(cores, quota) if quota else cores


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(limit_cores: float, idle_busy: float) -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "cgroup_cpu_quota": cgroup_cpu_quota(), "cpu_limit_cores": limit_cores,
            "img2dataset": version("img2dataset"), "ray": version("ray"), "opencv": cv2.__version__,
            "numpy": np.__version__, "background_busy_fraction_at_start": round(idle_busy, 3),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations (imported by img2dataset) phones home otherwise
        "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
    })
    env.update(extra or {})
    return env


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        vals = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / tick, sum(vals[:8]) / tick


def background_busy(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU busy while this process sleeps (other work that would skew the timings)."""
    b0, t0 = machine_cpu()
    time.sleep(seconds)
    b1, t1 = machine_cpu()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one live process (the server's share of the machine)."""
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


# ------------------------------------------------------------------------------------------ process-tree accounting


def become_subreaper() -> bool:
    """Orphaned descendants (Ray's daemons outlive the CLI) get re-parented to this process instead of init, so they
    stay in this process's tree, where ``TreeCpu``'s fallback and ``settle`` find them."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


class TreeCpu:
    """CPU seconds of one command's whole process tree, and nothing else on the machine.

    Preferred: a cgroup of its own (v1 ``cpuacct`` or v2 ``cpu.stat``), joined by the command before it execs, so
    every descendant, however short-lived or re-parented, is counted by the kernel. RUSAGE_CHILDREN would not do:
    Ray's raylet ignores SIGCHLD, so its workers' CPU never reaches any parent's rusage. Fallback (no writable
    cgroup): sample every descendant's CPU time every 0.1 s (this process is a subreaper, so orphans stay in its
    tree); what a process spends in its last 0.1 s is then missed."""

    ROOTS = (("/sys/fs/cgroup/cpuacct", "cpuacct.usage", 1e-9), ("/sys/fs/cgroup/unified", "cpu.stat", 1e-6),
             ("/sys/fs/cgroup", "cpu.stat", 1e-6))

    def __init__(self, name: str):
        self.path, self.file, self.scale, self.kind = None, "", 0.0, "psutil sampling every 0.1 s (no cgroup)"
        for root, file, scale in self.ROOTS:
            path = os.path.join(root, f"bench_download_{os.getpid()}_{name}")
            try:
                os.mkdir(path)
                open(os.path.join(path, file)).read()
                self.path, self.file, self.scale, self.kind = path, file, scale, f"cgroup {root}/{file}"
                break
            except OSError:
                if os.path.isdir(path):
                    os.rmdir(path)
        self._seen: dict[int, float] = {}
        self._stop = False
        self._thread: Any = None

    def preexec(self) -> None:  # runs in the child between fork and exec
        if self.path:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def start(self, keep: set[int]) -> None:
        if self.path:
            return
        import threading

        def sample() -> None:
            while not self._stop:
                for p in psutil.Process().children(recursive=True):
                    if p.pid not in keep:
                        try:
                            t = p.cpu_times()
                            self._seen[p.pid] = max(self._seen.get(p.pid, 0.0), t.user + t.system)
                        except psutil.Error:
                            pass
                time.sleep(0.1)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        if not self.path:
            return False
        return bool(open(os.path.join(self.path, "cgroup.procs")).read().strip())

    def seconds(self) -> float:
        if not self.path:
            self._stop = True
            if self._thread:
                self._thread.join()
            return sum(self._seen.values())
        text = open(os.path.join(self.path, self.file)).read()
        if self.file == "cpuacct.usage":
            return int(text) * self.scale
        return int(dict(line.split() for line in text.splitlines())["usage_usec"]) * self.scale

    def close(self) -> None:
        if self.path:
            try:
                os.rmdir(self.path)
            except OSError:
                pass


def settle(keep: set[int], meter: TreeCpu, timeout: float = 60.0) -> float:
    """Wait until every process the command started (its cgroup, or this tree minus ``keep``) has exited, reaping the
    ones re-parented here; seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
        for p in left:
            try:
                if p.ppid() == os.getpid() and p.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(p.pid, 0)
            except (psutil.Error, ChildProcessError):
                pass
        if not meter.alive() and not [p for p in left if _running(p)]:
            break
        time.sleep(0.05)
    return time.monotonic() - t0


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
