"""What every training rank does the same way, whichever model it trains: its entry point (the ``deepspeed``
launcher, Ray Train, or a plain process as one rank), its thread count, and the seeds and RNG state that make a
resumed run draw exactly what an uninterrupted one drew."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.config import Config, load_config
from pipeline.config.placement import TrainerPlacement
from pipeline.errors import ConfigError, PipelineError, rank_error_line
from pipeline.runtime import ds_seam
from pipeline.runtime.local_node import environ
from pipeline.storage.commit import write_text
from pipeline.storage.lease import Lease, LeaseToken
from pipeline.storage.urls import Workspace, is_local, join

T = TypeVar("T")


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed that is a function of (seed, step, rank) alone."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Every random draw of a step (caption dropout, noise, timesteps) comes from here, so a resumed run draws
    exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed(step_seed(seed, step, rank))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def single_rank_env() -> Iterator[bool]:
    """Outside a launcher (no WORLD_SIZE): make this process rank 0 of 1 for as long as it trains."""
    if "WORLD_SIZE" in os.environ:
        yield False
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with environ(env):
        yield True


LEASE_ENV = "PIPELINE_RUN_LEASE"  # the driver's lease on the output folder, handed to its ranks


@contextlib.contextmanager
def driver_lease(out: str, stage: str) -> Iterator[dict[str, str]]:
    """The driver holds ``out``'s lease while its ranks train; yields the environment that tells ranks its token."""
    with Lease(out, stage) as lease:
        env = {LEASE_ENV: json.dumps(dataclasses.asdict(lease.token))}
        saved = os.environ.get(LEASE_ENV)
        os.environ.update(env)  # the deepspeed launcher passes the driver's environment on to every rank
        try:
            yield env
        finally:
            if saved is None:
                os.environ.pop(LEASE_ENV, None)
            else:
                os.environ[LEASE_ENV] = saved


@contextlib.contextmanager
def rank_lease(out: str, stage: str, rank: int) -> Iterator[Callable[[], None]]:
    """What rank 0 calls before it commits a checkpoint or weights: the driver's lease check when a driver holds the
    lease, else (a rank started without one, e.g. ``deepspeed ... jobs/train_prior.py``) rank 0 holds it itself."""
    if os.environ.get(LEASE_ENV):
        token = LeaseToken(**json.loads(os.environ[LEASE_ENV]))
        yield token.check
    elif rank == 0:
        with Lease(out, stage) as lease:
            yield lease.token.check
    else:
        yield lambda: None


def write_resolved_config(cfg: Config, out: str) -> str:
    """``<out>/config.yaml``: the whole config a training run uses (in the run's storage), and a local copy of it,
    what the deepspeed launcher's ranks are started with; returns the local path."""
    from pipeline.config.docs import to_yaml

    text = to_yaml(cfg)
    write_text(join(out, "config.yaml"), text)
    ws = Workspace(out, role="launch")
    write_text(ws.at("config.yaml"), text)
    return ws.at("config.yaml")


def launch_ranks(module: str, cfg: Config, out: str, num_procs: int, prefix: str) -> None:
    """Run ``python -m <module> --config config.yaml`` on ``num_procs`` ranks through the deepspeed launcher on this
    machine, echoing rank 0's ``prefix`` lines; the launcher's log ends up in ``<out>/launcher.log``."""
    resolved = write_resolved_config(cfg, out)
    ws = Workspace(out, role="launch")
    try:
        ds_seam.launch(module, resolved, num_procs, ws.at("launcher.log"), prefix)
    finally:
        ws.push("launcher.log")


def launcher_of(cfg: Config, section: TrainerPlacement) -> str:
    """``deepspeed`` or ``ray`` for a trainer section's ``launcher`` (auto: Ray Train when this process runs on a Ray
    cluster, a Ray job or ``ray_address`` set; otherwise the deepspeed launcher here)."""
    if section.launcher != "auto":
        return section.launcher
    from pipeline.runtime.devices import on_cluster

    return "ray" if on_cluster(cfg) else "deepspeed"


def launch(cfg: Config, section: TrainerPlacement, out: str, stage: str, module: str,
           train: Callable[[Config, int, int], Any], num_procs: int, prefix: str) -> str:
    """Start a trainer's ranks, holding ``out``'s lease: on Ray Train workers (each runs ``train(cfg, rank, world)``,
    checkpoints in the run's storage, a lost worker group restarted from the last committed checkpoint up to
    ``max_failures`` times), or through the deepspeed launcher on this machine. Returns the launcher used."""
    launcher = launcher_of(cfg, section)
    with driver_lease(out, stage) as lease_env:
        if launcher == "ray":
            from pipeline.config import absolute_paths
            from pipeline.runtime import ray_seam

            ray_seam.init_ray(cfg)
            key = getattr(section, "SECTION", "dvae")
            ray_seam.check_demand(cfg, f"{key}.num_procs={num_procs} Ray Train workers of {key}.cpus_per_worker / "
                                  "gpus_per_worker / resources", section.request(), num_procs)
            write_resolved_config(cfg, out)
            ray_seam.train_on_workers(functools.partial(train, absolute_paths(cfg)), num_procs, section.request(),
                                      storage_path=join(out, "ray_train"), name=stage, env=lease_env,
                                      max_failures=section.max_failures, require_gpu=section.require_gpu)
        else:
            launch_ranks(module, cfg, out, num_procs, prefix)
    return launcher


def check_checkpoint_location(out: str, section: TrainerPlacement, key: str) -> None:
    """A deepspeed-launcher run over several nodes (``CROSS_SIZE`` > 1) cannot checkpoint into a node-local path:
    each node would hold only its own ranks' part, and no node could resume. Refused unless the path is shared."""
    nodes = int(os.environ.get("CROSS_SIZE") or 1)
    if nodes > 1 and is_local(out) and not section.shared_filesystem:
        raise ConfigError(f"{key} {out!r} is a local path, and this run spans {nodes} nodes: each node would keep "
                          f"only its own ranks' checkpoint files and none could resume. Put {key} (or run_dir) on "
                          f"object storage (s3://...), or, if that path is on a filesystem every node shares, set "
                          f"{key.rsplit('.', 1)[0]}.shared_filesystem=true")


def rank_main(argv: list[str] | None, description: str, train: Callable[[Config, int, int], T]) -> T:
    """``--config FILE [dotted.key=value ...]`` (plus the launcher's ``--local_rank``) → ``train(cfg, rank, world)``
    on this rank, in a DeepSpeed process group (one rank of one when no launcher started this process)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    threads = torch.get_num_threads()
    with single_rank_env() as standalone:
        world = int(os.environ["WORLD_SIZE"])
        if not torch.cuda.is_available():  # CPU ranks share the machine's cores (OMP_NUM_THREADS, if set, wins)
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // world)))
        ds_seam.init_distributed()
        rank = torch.distributed.get_rank()
        try:
            return train(cfg, rank, torch.distributed.get_world_size())
        except PipelineError as exc:  # the launcher shows this one line instead of 40 lines of every rank's traceback
            print(rank_error_line(exc, rank), flush=True)
            raise
        finally:
            # The one-rank process group stays for a later call in this process: DeepSpeed caches its groups.
            if standalone:
                torch.set_num_threads(threads)
