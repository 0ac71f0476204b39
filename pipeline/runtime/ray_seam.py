"""The Ray seam: engine wiring only. Only this module imports ray; the stages hand it plain callables.

- ``init_ray``: join the job's cluster (or start a local one).
- ``task`` + ``run_bounded``: a distributor of callables over Ray tasks, at most N in flight, retried, nothing dropped.
- ``driver_actor``: one object living on the driver's node, called like a plain object from any task.
- ``shard_workers``: a pool of actors, each fed one item at a time by a streaming task of its own (decode → encode),
  returning only a small result: the bytes move between workers, never through the driver.
- ``run_on_workers``: one remote call per argument tuple, results in order.
- ``train_on_workers``: a per-rank training function on Ray Train workers, in a DeepSpeed process group.
- ``check_demand`` / ``remote_args``: a stage's hardware request (from its config, never from what is up) checked
  against the cluster's node types (``pipeline.runtime.demand``) and turned into Ray's resource arguments.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray

from pipeline.config import Config
from pipeline.errors import PipelineError, RankError
from pipeline.runtime import demand, local_node
from pipeline.storage.urls import exists, join, write_bytes

log = logging.getLogger(__name__)

_RUNTIME_ENV = {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}}

# What tasks may learn from the driver's environment about object storage: where it is and where the credentials
# live, never the credentials themselves. A runtime_env is stored in the GCS, shown on the dashboard and written
# to Ray's logs; keys reach each node through the standard AWS chain (its env, ~/.aws, the instance profile).
_STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE")


def init_ray(cfg: Config) -> None:
    """Join ``cfg.ray_address`` (or the job's RAY_ADDRESS) if set, else start a local cluster of ``num_cpus`` CPUs."""
    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:  # a Ray job (RAY_ADDRESS is set by `ray job submit`) or an explicit cluster
        ray.init(address=address, runtime_env=_RUNTIME_ENV, log_to_driver=True)
    else:
        # address="local": always a cluster of our own, even when another Ray on this machine left its address in
        # /tmp/ray (a plain ray.init() would join that one, and refuse num_cpus)
        # The environment reaches the workers by inheritance (driver → raylet → workers), not as a job runtime_env:
        # the workers Ray starts ahead with the node (one per CPU) have no job yet, and a job with a runtime_env of
        # its own cannot use them, so they sat idle while the first tasks waited for fresh ones.
        with local_node.environ(_RUNTIME_ENV["env_vars"]):
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True,
                     configure_logging=False)
        node = ray._private.worker._global_node
        local_node.start_guardian([i.process.pid for infos in node.all_processes.values() for i in infos])
        # Runs before Ray's own exit hook (atexit is last in, first out): that one sleeps 0.5 s, then stops the
        # cluster's processes one by one, waiting up to a second for each; a local run's user waits for all of it.
        atexit.register(shutdown)


def node_id() -> str:
    """The Ray node this process runs on (the host name outside Ray)."""
    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def shutdown() -> None:
    """Disconnect; a local cluster this driver started is stopped too, faster than Ray's own shutdown, which stops
    its processes one by one, waiting up to a second for each (1.1-1.4 s for a local node, plus a 0.5 s sleep at
    exit): 0.3-0.4 s here. Joining a cluster (a Ray job) only disconnects, as before."""
    if not ray.is_initialized():
        return
    node = ray._private.worker._global_node  # set only where ray.init() started the node's processes
    if node is None:
        ray.shutdown()
        return
    procs = {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
    ray._private.worker._global_node = None  # the driver disconnects first (Ray's order), the processes go below
    try:
        ray.shutdown()
    finally:
        local_node.stop(procs)
        if node.is_head():
            node.destroy_external_storage()  # spilled objects, as Ray's own shutdown removes them
        node.kill_all_processes(check_alive=False, allow_graceful=True)  # finds them gone: Ray's records close


def storage_env() -> dict[str, Any]:
    """Non-secret object-store settings the driver was given, so tasks on any node reach the same S3."""
    env = {k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster YAML on the head node


def node_types(cfg: Config) -> tuple[list[demand.NodeType], str]:
    """What the cluster can ever offer: the node types of ``cluster_config`` (or of the head's bootstrap config
    that `ray up` wrote), else the nodes that are up; and where that came from."""
    from pipeline.storage.urls import read_bytes

    path = cfg.cluster_config or (BOOTSTRAP_CONFIG if os.path.exists(os.path.expanduser(BOOTSTRAP_CONFIG)) else "")
    if path:
        local = os.path.expanduser(path)
        return demand.node_types_from_yaml(path, read_bytes(local).decode()), f"node types of {path}"
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return demand.node_types_from_nodes(nodes), "the nodes that are up; no autoscaler config (cluster_config)"


def check_demand(cfg: Config, key: str, request: dict[str, float], count: int = 1) -> None:
    """``count`` workers of ``request`` fit the cluster's node types, or a ``ConfigError`` naming ``key``."""
    types, source = node_types(cfg)
    demand.check(key, request, count, types, source)


def remote_args(request: dict[str, float]) -> dict[str, Any]:
    """Ray's ``num_cpus`` / ``num_gpus`` / ``resources`` for a request in resource names (``Hardware.request``)."""
    custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": float(request.get("CPU", 0)), "num_gpus": float(request.get("GPU", 0)),
            **({"resources": custom} if custom else {})}


def probe_device(stage: str, request: dict[str, float], require_gpu: bool) -> str:
    """The device a worker of ``request`` gets (``cuda`` or ``cpu``), found by one task that asks for exactly that
    (on an autoscaling cluster it is also what brings the node type up). A GPU asked for on a node without CUDA
    warns there, naming the node, or raises ``HardwareError`` under ``require_gpu``."""
    from pipeline.runtime.devices import worker_device

    def probe() -> str:
        return worker_device(stage, float(request.get("GPU", 0)), require_gpu).type

    try:
        return ray.get(ray.remote(probe).options(**remote_args(request), **storage_env()).remote())
    except Exception as exc:  # noqa: BLE001 - a HardwareError comes back wrapped
        found = user_error(exc)
        if found is None:
            raise
        raise found from None


# ------------------------------------------------------------------------------------------------ the distributor


def task(fn: Callable[..., Any], *, num_cpus: float = 1, num_gpus: float = 0, resources: dict | None = None,
         max_retries: int = 2) -> Callable[..., Any]:
    """``fn`` as a Ray task: the returned callable submits it and returns a handle for ``run_bounded``.
    ``max_retries`` covers a worker process that died (OOM, node loss); raised errors are ``run_bounded``'s."""
    remote = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, resources=dict(resources or {}),
                                    max_retries=max_retries, **storage_env())
    return lambda *args: remote.remote(*args)


def run_bounded(submit: Callable[[Any, int], Any], items: Iterable[Any], max_in_flight: int, retries: int,
                on_result: Callable[[Any, Any], None], on_failure: Callable[[Any, str], None],
                name: Callable[[Any], str] = str) -> dict[str, int]:
    """Run ``submit(item, attempt) -> handle`` over ``items`` (any iterable, read lazily) with at most
    ``max_in_flight`` handles outstanding: the driver holds O(max_in_flight) handles and results whatever the number
    of items, and hands each result to ``on_result(item, value)`` as it lands instead of keeping it. A failed item is
    resubmitted (``attempt`` + 1) up to ``retries`` times, then reported to ``on_failure(item, error)``; nothing is
    dropped. Returns counters: submitted, completed, failed, retried, peak_in_flight."""
    todo = iter(items)
    again: list[tuple[Any, int]] = []  # failed items waiting for another attempt go before fresh ones
    pending: dict[ray.ObjectRef, tuple[Any, int]] = {}
    stats = {"submitted": 0, "completed": 0, "failed": 0, "retried": 0, "peak_in_flight": 0}
    exhausted = False
    while True:
        while len(pending) < max_in_flight and (again or not exhausted):
            if again:
                item, attempt = again.pop()
            else:
                item = next(todo, _END)
                if item is _END:
                    exhausted = True
                    break
                attempt = 0
            pending[submit(item, attempt)] = (item, attempt)
            stats["submitted"] += 1
        if not pending:
            return stats
        stats["peak_in_flight"] = max(stats["peak_in_flight"], len(pending))
        refs = list(pending)
        ready, _ = ray.wait(refs, num_returns=1)
        if len(refs) > 1:  # drain everything else already finished: one wait per batch, not per task
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref, value, error in _results(ready):
            item, attempt = pending.pop(ref)
            if error is None:
                stats["completed"] += 1
                on_result(item, value)
            elif attempt < retries:
                log.warning("%s attempt %d failed (%s); retrying", name(item), attempt + 1, error)
                stats["retried"] += 1
                again.append((item, attempt + 1))
            else:
                stats["failed"] += 1
                on_failure(item, error)


_END = object()


def _results(refs: list) -> list[tuple[Any, Any, str | None]]:
    """(ref, value, error) for finished refs: one batched get, per-ref gets only when something in it failed."""
    try:
        return [(r, v, None) for r, v in zip(refs, ray.get(refs))]
    except Exception:  # noqa: BLE001 — find which ones failed; the others keep their values
        out = []
        for r in refs:
            try:
                out.append((r, ray.get(r), None))
            except Exception as exc:  # noqa: BLE001 — a failure is retried or reported by the caller
                out.append((r, None, f"{type(exc).__name__}: {exc}"))
        return out


# ------------------------------------------------------------------------------------------------- driver actor


def _call(handle: Any, method: str, *args: Any) -> Any:
    return ray.get(getattr(handle, method).remote(*args))


class ActorProxy:
    """A Ray actor seen as a plain object: ``proxy.method(args)`` runs on the actor and returns its result. It
    pickles into tasks (a partial of the handle), so a task on any node calls the same actor."""

    def __init__(self, handle: Any):
        self._handle = handle

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        return functools.partial(_call, self._handle, method)


def driver_actor(cls: type, *args: Any) -> ActorProxy:
    """One instance of ``cls`` on the driver's node (the head on a cluster), with no CPU: it lives exactly as long as
    the job, so losing a worker node never loses it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ActorProxy(ray.remote(cls).options(num_cpus=0, scheduling_strategy=here).remote(*args))


# ------------------------------------------------------------------------------------- Ray Data and plain remote


def _expand_stream(expand: Callable[[Any], Iterator[Any]], item: Any) -> Iterator[Any]:
    yield from expand(item)


class _StreamWorker:
    """One actor of ``shard_workers``: it owns an instance of the stage's worker class and, for each item, streams
    ``expand(item)``'s batches from a task of their own (on whatever node fits that task's request) into the
    worker's ``process(item, batches)``. The batches pass from the task's node to this actor's node directly."""

    def __init__(self, make: type, kwargs: dict[str, Any], expand: Callable[[Any], Iterator[Any]],
                 expand_request: dict[str, float], backlog: int):
        self.worker = make(**kwargs)
        self.expand = expand
        self.remote_expand = ray.remote(_expand_stream).options(
            num_returns="streaming", _generator_backpressure_num_objects=backlog, name=type(expand).__name__,
            **remote_args(expand_request),
            **storage_env())

    def run(self, item: Any) -> Any:
        stream = self.remote_expand.remote(self.expand, item)
        return self.worker.process(item, (ray.get(ref) for ref in stream))


def shard_workers(make: type, kwargs: dict[str, Any], count: int, request: dict[str, float],
                  expand: Callable[[Any], Iterator[Any]], expand_request: dict[str, float], name: str,
                  backlog: int = 4) -> Callable[[Any, int], Any]:
    """``count`` actors of ``make(**kwargs)`` (each asking for ``request``; restarted by Ray where their node is
    lost), and a ``submit(item, attempt)`` for ``run_bounded`` that hands ``item`` to the next actor: the actor
    streams ``expand(item)`` (a task asking for ``expand_request``, at most ``backlog`` batches ahead) into
    ``make.process(item, batches)`` and returns only its small result to the caller; ``name`` is the actors' class
    name, which their processes show (``ray::<name>``). A call on an actor that died
    fails, and ``run_bounded`` resubmits it to an actor that is up."""
    cls = ray.remote(type(name, (_StreamWorker,), {}))  # the process title: ray::<name>.run
    # One item at a time per actor: a threaded actor (max_concurrency > 1) raced two first imports of torch in one
    # process ("partially initialized module 'torch'"), seen on the autoscaling test's GPU node.
    actors = [cls.options(**remote_args(request), max_restarts=-1, max_task_retries=0, **storage_env()).remote(
        make, kwargs, expand, expand_request, backlog) for _ in range(count)]
    turn = iter(range(1 << 62))

    def submit(item: Any, attempt: int) -> Any:
        return actors[next(turn) % count].run.remote(item)

    return submit


def run_on_workers(fn: Callable[..., Any], args: list[tuple], request: dict[str, float]) -> list[Any]:
    """``fn(*a)`` for each ``a`` in ``args`` as Ray tasks side by side, each asking for ``request``; the results in
    order. A ``PipelineError`` raised in a task is raised here as itself (one line at the CLI)."""
    remote = ray.remote(fn).options(**remote_args(request), max_retries=2, **storage_env())  # retried on node loss
    try:
        return ray.get([remote.remote(*a) for a in args])
    except Exception as exc:  # noqa: BLE001 - Ray wraps the task's error
        found = user_error(exc)
        if found is None:
            raise
        raise found from None


# ---------------------------------------------------------------------------------------------------- Ray Train


def _announce_restart(started: str) -> None:
    """Rank 0 of each worker group: say so when this group replaces one that failed, with the checkpoint Ray Train
    last received (the ranks themselves resume from the run's latest committed checkpoint either way)."""
    if not exists(started):
        write_bytes(started, b"")
        return
    restored, last = ray.train.get_checkpoint(), "none reported yet"
    if restored is not None:
        with restored.as_directory() as d, open(os.path.join(d, "pointer.json")) as f:
            last = f.read().strip()
    print(f"[ray-train] restarted after a failure; last reported checkpoint {last}", flush=True)


def train_on_workers(per_rank: Callable[[int, int], Any], num_workers: int, request: dict[str, float],
                     storage_path: str, name: str, env: dict[str, str] | None = None, max_failures: int = 0,
                     require_gpu: bool = False) -> None:
    """``per_rank(rank, world)`` on ``num_workers`` Ray Train workers (a ``TorchTrainer``), each asking for
    ``request``, in the process group Ray Train makes, adopted by DeepSpeed; workers without CUDA use DeepSpeed's
    CPU accelerator and gloo (a GPU asked for but absent warns, or fails under ``require_gpu``: ``probe_device``).
    ``env`` is set in each worker first (e.g. the driver's lease token; never secrets).

    Ray Train keeps its run state under ``storage_path`` (a local path or any fsspec URL: the run's storage), and
    every checkpoint the trainer commits is reported to it (``ray.train.report``; the reported checkpoint is a small
    pointer to the committed folder, which holds the bytes once). A worker group that fails (a lost node, a killed
    worker) is restarted up to ``max_failures`` times (``FailureConfig``); the restarted ranks resume from the last
    committed checkpoint, which ``ray.train.get_checkpoint`` also names."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(_: dict[str, Any]) -> None:
        import torch

        os.environ.update(env or {})
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is first imported in this worker
        from pipeline.runtime import ds_seam

        ds_seam.init_distributed()  # Ray Train already made the process group; DeepSpeed adopts it
        rank = torch.distributed.get_rank()
        if rank == 0:
            _announce_restart(started)
        ds_seam.on_commit(_report_commit)
        try:
            per_rank(rank, torch.distributed.get_world_size())
        except PipelineError as exc:  # travels back as one line, not as every worker's traceback
            raise RankError(f"rank {rank}: {' '.join(str(exc).split())}", exc.exit_code) from None

    # A marker of this fit() in the run's storage: a worker group that finds it is a restart (Ray Train's reported
    # checkpoint cannot tell: a node lost before its first report reaches Ray Train restarts with none).
    started = join(storage_path, name, f"_started_{uuid.uuid4().hex}")
    path, filesystem = _train_storage(storage_path)
    use_gpu = request.get("GPU", 0) > 0
    cuda = use_gpu and probe_device(name, request, require_gpu) == "cuda"
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                            resources_per_worker={k: v for k, v in request.items() if k != "GPU" or use_gpu})
    trainer = TorchTrainer(loop, scaling_config=scaling, torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
                           run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                                                failure_config=FailureConfig(max_failures=max_failures)))
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray Train wraps the worker's error; find a user-facing one inside
        found = user_error(exc)
        if found is None:
            raise
        raise RankError(str(found), found.exit_code) from None


def _report_commit(folder: str, tag: str, step: int) -> None:
    """Every rank, after a checkpoint commit: report it to Ray Train (rank 0 with the pointer as its checkpoint)."""
    import json
    import tempfile

    from ray.train import Checkpoint

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({"step": step})
        return
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "pointer.json"), "w") as f:
            json.dump({"folder": folder, "tag": tag, "step": step}, f)
        ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d))


def _train_storage(url: str) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem) for a local path or any fsspec URL: object stores through
    fsspec (so the endpoint and credentials are the ones every other stage uses, from the standard chain)."""
    if "://" not in url or url.startswith("file://"):
        return os.path.abspath(url.removeprefix("file://")), None
    import pyarrow.fs

    from pipeline.storage.commit import fs_and_path

    fs, path = fs_and_path(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def user_error(exc: BaseException | None) -> PipelineError | None:
    """The ``PipelineError`` a Ray error wraps (``__cause__`` chain or a RayTaskError's ``cause``), if any."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, PipelineError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None
