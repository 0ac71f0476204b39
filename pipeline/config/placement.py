"""Where a stage's work runs: the hardware each of its workers asks the cluster for (``Hardware``, in every section
that computes), and how a trainer's ranks are started (``TrainerPlacement``, shared by every trained model's
section). The demand comes from these keys, never from what the cluster has at start: on an autoscaling cluster the
request is what makes the autoscaler launch the node type that meets it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.checks import check as _check

LAUNCHERS = ("auto", "deepspeed", "ray")


def check_resources(key: str, resources: dict[str, float]) -> None:
    """Custom Ray resources only (CPU and GPU have keys of their own), each with an amount > 0."""
    for name, amount in resources.items():
        _check(name not in {"CPU", "GPU", "memory", "object_store_memory"} and amount > 0, f"{key}.{name}",
               "must be a custom resource with an amount > 0 (CPUs and GPUs have keys of their own)")


@dataclass
class Hardware:
    cpus_per_worker: float = 1.0
    """CPUs each of the stage's workers (Ray task, actor or Ray Train worker) asks for."""
    gpus_per_worker: float = 0.0
    """GPUs each worker asks for (fractions share a GPU). 0: CPU only. On a node that advertises a GPU but has no
    CUDA (a misconfigured image) the worker warns once, naming the node, and runs on CPU unless require_gpu."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker asks for, e.g. {gpu_a100: 1} to pick a node type of cluster/config.yaml."""
    require_gpu: bool = False
    """Fail, naming the node, when a worker that asked for a GPU finds no CUDA device, instead of running on CPU."""

    def check_hardware(self, section: str) -> None:
        _check(self.cpus_per_worker >= 0, f"{section}.cpus_per_worker", "must be >= 0")
        _check(self.gpus_per_worker >= 0, f"{section}.gpus_per_worker", "must be >= 0")
        _check(self.gpus_per_worker <= 1 or self.gpus_per_worker == int(self.gpus_per_worker),
               f"{section}.gpus_per_worker", "above 1 must be a whole number")
        _check(self.cpus_per_worker > 0 or self.gpus_per_worker > 0 or bool(self.resources),
               f"{section}.cpus_per_worker", "a worker must ask for something (CPUs, GPUs or a resource)")
        _check(not self.require_gpu or self.gpus_per_worker > 0, f"{section}.require_gpu",
               f"needs {section}.gpus_per_worker > 0")
        check_resources(f"{section}.resources", self.resources)

    def request(self) -> dict[str, float]:
        """The per-worker demand as Ray resource names."""
        out = {"CPU": float(self.cpus_per_worker), "GPU": float(self.gpus_per_worker), **self.resources}
        return {k: v for k, v in out.items() if v > 0}


@dataclass
class TrainerPlacement(Hardware):
    launcher: str = "auto"
    """auto: Ray Train when the stage runs on a Ray cluster (a Ray job, or ray_address set), else the deepspeed
    launcher on this machine; deepspeed: the deepspeed launcher (local, or your own `deepspeed --hostfile`); ray:
    Ray Train's TorchTrainer with num_procs workers, each asking for cpus_per_worker / gpus_per_worker / resources,
    checkpoints in the run's storage."""
    max_failures: int = 3
    """Ray Train: worker-group failures (a lost node, a killed worker) survived by restarting from the last
    committed checkpoint; -1: without limit."""
    shared_filesystem: bool = False
    """A multi-node deepspeed-launcher run with a local output path is refused unless this says that path is on a
    filesystem every node shares (NFS, Lustre); an object-storage URL needs nothing."""

    def check_placement(self, section: str) -> None:
        _check(self.launcher in LAUNCHERS, f"{section}.launcher", f"must be one of {', '.join(LAUNCHERS)}")
        _check(self.max_failures >= -1, f"{section}.max_failures", "must be >= -1")
        self.check_hardware(section)
