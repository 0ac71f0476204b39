"""The Ray seam: engine wiring only. Only this module imports ray; the stages hand it plain callables.

- ``init_ray``: join the job's cluster (or start a local one).
- ``task`` + ``run_bounded``: a distributor of callables over Ray tasks, at most N in flight, retried, nothing dropped.
- ``driver_actor``: one object living on the driver's node, called like a plain object from any task.
- ``stream_batches``: a Ray Data pipeline, CPU ``flat_map`` then an actor pool, streamed back batch by batch.
- ``run_on_workers``: one remote call per argument tuple, results in order.
- ``train_on_workers``: a per-rank training function on Ray Train workers, in a DeepSpeed process group.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import ray

from pipeline.config import Config
from pipeline.errors import PipelineError, RankError

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
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, runtime_env=_RUNTIME_ENV,
                 log_to_driver=True, configure_logging=False)
        _guard_local_cluster()
    # Ray Data's own progress bars are noisy in logs; the stages print their own progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False


def _guard_local_cluster() -> None:
    """This driver started the cluster: start ``pipeline.runtime.guardian`` to stop it if the driver is killed."""
    import subprocess
    import sys

    import psutil

    node = ray._private.worker._global_node
    targets = []
    for infos in node.all_processes.values():
        for info in infos:
            pid = info.process.pid
            try:
                targets.append(f"{pid}:{psutil.Process(pid).create_time()}")
            except psutil.Error:
                pass
    subprocess.Popen([sys.executable, "-m", "pipeline.runtime.guardian", str(os.getpid()), *targets],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": _package_root()})


def _package_root() -> str:
    return os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            os.environ.get("PYTHONPATH", "")])


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def storage_env() -> dict[str, Any]:
    """Non-secret object-store settings the driver was given, so tasks on any node reach the same S3."""
    env = {k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def cluster_gpus() -> float:
    """GPUs the cluster has right now."""
    return float(ray.cluster_resources().get("GPU", 0))


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


def stream_batches(items: list[dict[str, Any]], expand: Callable[[dict[str, Any]], list[dict[str, Any]]],
                   actor: type, actor_kwargs: dict[str, Any], batch_size: int, actors: int,
                   gpus_per_actor: float) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data: ``items`` (one block each) → ``expand`` on CPU tasks (a ``flat_map``) → an actor pool of ``actors``
    instances of ``actor(**actor_kwargs)`` called on batches of ``batch_size`` rows → numpy batches, as they land."""
    env = storage_env()  # the S3 endpoint/region the driver was given reach every task and actor
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(expand, **env)
    ds = ds.map_batches(actor, fn_constructor_kwargs=actor_kwargs, batch_size=batch_size, concurrency=actors,
                        num_gpus=gpus_per_actor, batch_format="numpy", **env)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def run_on_workers(fn: Callable[..., Any], args: list[tuple], num_cpus: float, num_gpus: float) -> list[Any]:
    """``fn(*a)`` for each ``a`` in ``args`` as Ray tasks side by side; the results in order."""
    remote = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, **storage_env())
    return ray.get([remote.remote(*a) for a in args])


# ---------------------------------------------------------------------------------------------------- Ray Train


def train_on_workers(per_rank: Callable[[int, int], Any], num_workers: int, use_gpu: bool, storage_path: str,
                     name: str, env: dict[str, str] | None = None) -> None:
    """``per_rank(rank, world)`` on ``num_workers`` Ray Train workers (a ``TorchTrainer``), in the process group Ray
    Train makes, adopted by DeepSpeed; CPU workers use DeepSpeed's CPU accelerator and gloo. ``env`` is set in each
    worker first (e.g. the driver's lease token; never secrets)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(_: dict[str, Any]) -> None:
        import torch

        os.environ.update(env or {})
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is first imported in this worker
        from pipeline.runtime import ds_seam

        ds_seam.init_distributed()  # Ray Train already made the process group; DeepSpeed adopts it
        rank = torch.distributed.get_rank()
        try:
            per_rank(rank, torch.distributed.get_world_size())
        except PipelineError as exc:  # travels back as one line, not as every worker's traceback
            raise RankError(f"rank {rank}: {' '.join(str(exc).split())}", exc.exit_code) from None

    trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
                           torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                           run_config=RunConfig(name=name, storage_path=storage_path))
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray Train wraps the worker's error; find a user-facing one inside
        found = user_error(exc)
        if found is None:
            raise
        raise RankError(str(found), found.exit_code) from None


def user_error(exc: BaseException | None) -> PipelineError | None:
    """The ``PipelineError`` a Ray error wraps (``__cause__`` chain or a RayTaskError's ``cause``), if any."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, PipelineError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None
