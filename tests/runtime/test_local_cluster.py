"""A local cluster started by ``init_ray``: its workers get the pipeline's environment by inheritance (the driver's
own environment is left as it was), and a normal exit stops every process of it (the seam's own fast stop)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DRIVER = r"""
import json, os, sys
import psutil, ray
from pipeline.config import Config
from pipeline.runtime import ray_seam

os.environ.pop("OMP_NUM_THREADS", None)
ray_seam.init_ray(Config(num_cpus=1))
def env():
    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "NO_ALBUMENTATIONS_UPDATE")}, os.getpid()
seen, worker = ray_seam.run_on_workers(env, [()], {"CPU": 1})[0]
node = ray._private.worker._global_node
pids = [i.process.pid for infos in node.all_processes.values() for i in infos]
family = set(pids)
for pid in pids:
    family.update(c.pid for c in psutil.Process(pid).children(recursive=True))
print(json.dumps({"task_env": seen, "driver_omp": os.environ.get("OMP_NUM_THREADS"), "worker": worker,
                  "pids": sorted(family)}), flush=True)
"""


def test_local_cluster_env_and_exit_stops_everything():
    ray_tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO)
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=180)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["task_env"] == {"OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    assert out["driver_omp"] is None  # set for the cluster's processes only
    assert out["worker"] in out["pids"]  # the task's worker is one of the node's descendants, and is stopped too
    assert len(out["pids"]) >= 5  # raylet, GCS, dashboard, monitors, agents, workers: all seen
    deadline = time.monotonic() + 10
    while True:  # the raylet's workers notice its exit on their own; everything else is gone at driver exit
        alive = [p for p in out["pids"] if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not alive, [psutil.Process(p).cmdline()[:3] for p in alive]
