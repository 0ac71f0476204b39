"""A Ray cluster of machines that share nothing, on one machine.

Each node is its own ``ray start --block`` started by ``unshare -m -p -f --mount-proc`` with a fresh tmpfs mounted
over ``/tmp``: a private mount namespace (its ``/tmp``, where Ray keeps its session and where the pipeline's node
scratch and cache live, is seen by no other node) and a private PID namespace (``ray start`` is its init, so a
SIGKILL to it takes the whole node down at once, like a machine losing power, and no ``ray stop`` of one node can
reach another's processes). What nodes share is what machines of one image share: the installed environment and
the repository (read-only by convention), the network, and object storage (moto's S3 server on loopback). Jobs
reach the cluster only through the Jobs API with a ``working_dir``, as ``ray job submit`` does.

Needs root (``unshare -m``), which these machines give.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Node death is noticed after 3 missed health checks 1 s apart (Ray's default is 5 × 3 s).
FAST_DETECT = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: str
    resources: dict[str, float] = field(default_factory=dict)

    def init_pid(self) -> int | None:
        """The node's PID-namespace init (``ray start``): unshare's one child."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        return children[0].pid if children else None

    def kill(self) -> None:
        """SIGKILL the node's init: the kernel kills every process in its PID namespace, no drain, no cleanup."""
        pid = self.init_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


class IsolatedCluster:
    """A head with 0 CPUs (it runs job drivers only) and worker nodes, each in its own mount and PID namespace."""

    def __init__(self, workdir: str, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PIPELINE_SCRATCH": "/tmp/pipeline-scratch",
                    "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
        self.port, self.dashboard_port = free_port(), free_port()
        self.head: Node | None = None
        self.workers: list[Node] = []
        self._count = 0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], resources: dict[str, float]) -> Node:
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                 "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())]
        ray_cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *ports, *args,
                   "--resources", json.dumps(resources)]
        script = f"mount -t tmpfs -o size=4g tmpfs /tmp && exec {shlex.join(ray_cmd)}"
        log = os.path.join(self.workdir, f"{name}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(["unshare", "-m", "-p", "-f", "--mount-proc", "sh", "-c", script], env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        return Node(name, proc, log, resources)

    def start(self, workers: int, cpus: int = 1, resources: dict[str, float] | None = None) -> IsolatedCluster:
        self.head = self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=true",
                                         "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                         f"--system-config={json.dumps(FAST_DETECT)}"], {})
        for _ in range(workers):
            self.add_worker(cpus, resources)
        self.wait_for_nodes(1 + workers)
        return self

    def add_worker(self, cpus: int = 1, resources: dict[str, float] | None = None) -> Node:
        self._count += 1
        name = f"worker{self._count}"
        # A resource named after the node lets a test map Ray's node ids back to the process it may kill.
        node = self._start(name, [f"--address=127.0.0.1:{self.port}", f"--num-cpus={cpus}"],
                           {**(resources or {}), f"iso_{name}": 1})
        self.workers.append(node)
        return node

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(self.dashboard, limit=1000) if n.state == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._check_alive()
            try:
                if len(self.alive_nodes()) >= n and self.client() is not None:
                    return
            except Exception:  # noqa: BLE001 - the dashboard answers only once the head is up
                pass
            time.sleep(1)
        raise AssertionError(f"{n} nodes not up after {timeout}s:\n{self.logs()}")

    def _check_alive(self) -> None:
        for node in [self.head, *self.workers]:
            if node is not None and node.proc.poll() is not None:
                raise AssertionError(f"node {node.name} exited ({node.proc.returncode}):\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for node in [self.head, *self.workers]:
            if node is not None and os.path.exists(node.log):
                with open(node.log) as f:
                    out.append(f"--- {node.name}\n{f.read()[-1500:]}")
        return "\n".join(out)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def node_name(self, node_id: str) -> str | None:
        """Our name of the worker node with Ray id ``node_id``."""
        for n in self.alive_nodes():
            if n.node_id == node_id:
                names = [k.removeprefix("iso_") for k in (n.resources_total or {}) if k.startswith("iso_worker")]
                return names[0] if names else None
        return None

    def worker(self, name: str) -> Node:
        return next(w for w in self.workers if w.name == name)

    def kill_worker(self, name: str) -> None:
        node = self.worker(name)
        node.kill()
        self.workers.remove(node)

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            if node is not None and node.proc.poll() is None:
                node.kill()

    # -------------------------------------------------------------------------------------------------- jobs

    def submit(self, stage: str, overrides: list[str], config: str = "configs/tiny.yaml") -> str:
        entrypoint = shlex.join([sys.executable, f"jobs/{stage}.py", "--config", config, *overrides])
        client, deadline = self.client(), time.time() + 90
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": REPO})
            except RuntimeError as exc:  # "No available agent" until the head's dashboard agent registered
                if "No available agent" not in str(exc) or time.time() > deadline:
                    raise
                time.sleep(1)

    def wait(self, job: str, timeout: float = 600.0) -> str:
        client, deadline = self.client(), time.time() + timeout
        while time.time() < deadline:
            status = str(client.get_job_status(job))
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(1)
        client.stop_job(job)
        raise AssertionError(f"job {job} still running after {timeout}s:\n{client.get_job_logs(job)[-4000:]}")

    def run(self, stage: str, overrides: list[str], timeout: float = 600.0) -> str:
        """Submit a stage as a job, wait for it; its log. A failed job fails the test with its log's tail."""
        job = self.submit(stage, overrides)
        status = self.wait(job, timeout)
        logs = self.client().get_job_logs(job)
        assert status == "SUCCEEDED", f"{stage} job {status}:\n{logs[-6000:]}"
        return logs
