"""An autoscaling Ray cluster on one machine: Ray's fake multi-node provider, in miniature of cluster/config.yaml.

The head (``CPU: 0``) runs Ray's autoscaler (``ray start --head --autoscaling-config``, ``RAY_FAKE_CLUSTER=1``);
the worker node types start at zero nodes, and the provider starts a real raylet when the autoscaler asks for one
of a type: a ``cpu_worker`` with the ``download`` resource, a ``gpu_worker`` advertising ``GPU: 1`` (no CUDA is needed
for Ray's scheduler; code on it falls back to CPU and says so). Which node type a node is shows in its resources.

Contained: the head is started by ``unshare -m -p -f --mount-proc`` with a tmpfs over ``/tmp``, so the autoscaler's
nodes live in its PID namespace (a SIGKILL of the namespace's init ends them all, and nothing here can stop another
Ray on this machine) and its files in its own ``/tmp``. The provider's ``gcs_address`` lets the head use a free port
instead of 6379. Object storage (moto's S3 on loopback) is what the jobs share with the test.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
from isolated import REPO, free_port

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
CONFIG_IN_NS = "/tmp/autoscaler.yaml"  # inside the head's namespace, where its job drivers read it too


def autoscaler_config(gcs: str, types: dict[str, dict]) -> dict:
    """A fake_multinode cluster YAML: a 0-CPU head and ``types`` (name → resources, max_workers), min 0 each."""
    nodes = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, spec in types.items():
        nodes[name] = {"resources": spec["resources"], "node_config": {}, "min_workers": 0,
                       "max_workers": spec["max_workers"]}
    return {"cluster_name": "fake", "max_workers": sum(t["max_workers"] for t in types.values()),
            "upscaling_speed": 10, "idle_timeout_minutes": 60,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs},
            "auth": {"ssh_user": "ubuntu"}, "available_node_types": nodes, "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}


class AutoscalingCluster:
    def __init__(self, workdir: str, types: dict[str, dict], env: dict[str, str] | None = None):
        import ray._private.services

        self.ip = ray._private.services.get_node_ip_address()
        self.port, self.dashboard_port = free_port(), free_port()
        self.config = autoscaler_config(f"{self.ip}:{self.port}", types)
        self.log = os.path.join(workdir, "head.log")
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_YAML": json.dumps(self.config),
                    "PIPELINE_SCRATCH": "/tmp/pipeline-scratch",
                    "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> AutoscalingCluster:
        ray_cmd = [RAY, "start", "--head", "--block", f"--port={self.port}", f"--node-ip-address={self.ip}",
                   "--num-cpus=0", f"--autoscaling-config={CONFIG_IN_NS}", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats",
                   # Ray's fixed default ports may be held by another Ray on this machine: free ones for the head
                   "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                   "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                   "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())]
        script = (f"mount -t tmpfs -o size=6g tmpfs /tmp && printf '%s' \"$AUTOSCALER_YAML\" > {CONFIG_IN_NS} && "
                  f"exec {shlex.join(ray_cmd)}")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(["unshare", "-m", "-p", "-f", "--mount-proc", "sh", "-c", script],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.t0 = time.time()
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the head exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                if self.nodes() and self.client() is not None:
                    return self
            except Exception:  # noqa: BLE001 - the dashboard answers only once the head is up
                pass
            time.sleep(1)
        raise AssertionError(f"head not up after 180s:\n{self.logs()}")

    def logs(self) -> str:
        with open(self.log) as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        """SIGKILL the namespace's init: every node the autoscaler started goes with it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for child in psutil.Process(self.proc.pid).children():
            os.kill(child.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(self.dashboard, limit=1000, detail=True) if n.state == "ALIVE"]

    def node_type(self, node_id: str) -> str:
        """head / gpu_worker / cpu_worker, from the node's resources."""
        from ray.util.state import list_nodes

        for n in list_nodes(self.dashboard, limit=1000, detail=True):
            if n.node_id == node_id:
                res = n.resources_total or {}
                return "head" if n.is_head_node else "gpu_worker" if res.get("GPU") else "cpu_worker"
        return "unknown"

    def autoscaler_events(self) -> list[str]:
        """The autoscaler's launch lines from the head's monitor log (inside the namespace: read via /proc)."""
        ns_root = f"/proc/{self.init_pid()}/root"
        # session_latest is a link to an absolute path: resolve it inside the namespace's root, not this one's
        session = os.readlink(f"{ns_root}/tmp/ray/session_latest")
        logs = f"{ns_root}{session}/logs" if session.startswith("/") else f"{ns_root}/tmp/ray/{session}/logs"
        lines = []
        for name in ("monitor.log", "monitor.out"):
            path = os.path.join(logs, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    lines += [ln.strip() for ln in f if "Launching" in ln or "new nodes for launch" in ln]
        return lines

    def init_pid(self) -> int:
        return psutil.Process(self.proc.pid).children()[0].pid

    def submit(self, stage: str, overrides: list[str], config: str = "configs/tiny.yaml") -> str:
        entrypoint = shlex.join([sys.executable, f"jobs/{stage}.py", "--config", config,
                                 f"cluster_config={CONFIG_IN_NS}", *overrides])
        client, deadline = self.client(), time.time() + 90
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": REPO})
            except RuntimeError as exc:  # "No available agent" until the head's dashboard agent registered
                if "No available agent" not in str(exc) or time.time() > deadline:
                    raise
                time.sleep(1)


class CpuMeter:
    """CPU seconds of every process in the cluster's PID namespace, sampled while a job runs: the job driver's
    (its command line names the job script) against everything else the cluster spent. A process that ends between
    two samples loses at most its last interval, so the driver's share, if anything, reads high."""

    def __init__(self, cluster: AutoscalingCluster, script: str):
        self.ns = os.readlink(f"/proc/{cluster.init_pid()}/ns/pid")
        self.script, self.seen, self.driver = script, {}, set()

    def sample(self) -> None:
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.readlink(f"/proc/{p.pid}/ns/pid") != self.ns:
                    continue
                t = p.cpu_times()
                key = (p.pid, p.create_time())
                self.seen[key] = max(self.seen.get(key, 0.0), t.user + t.system)
                if any(self.script in a for a in (p.info["cmdline"] or [])):
                    self.driver.add(key)
            except (psutil.Error, OSError):
                continue

    def figures(self) -> dict[str, float]:
        driver = sum(v for k, v in self.seen.items() if k in self.driver)
        total = sum(self.seen.values())
        return {"driver_cpu_s": round(driver, 2), "cluster_cpu_s": round(total, 2),
                "driver_share": round(driver / max(total, 1e-9), 4)}


def wait_job(cluster: AutoscalingCluster, job: str, timeout: float, meter: CpuMeter | None = None) -> str:
    client, deadline = cluster.client(), time.time() + timeout
    while time.time() < deadline:
        if meter:
            meter.sample()
        status = str(client.get_job_status(job))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    client.stop_job(job)
    raise AssertionError(f"job {job} still running after {timeout}s:\n{client.get_job_logs(job)[-4000:]}")
