"""The device a worker computes on, from what its stage asked for and what the node really has.

A worker that asked for a GPU on a node without CUDA (an image without drivers, a node type whose ``GPU`` resource
is declared but absent) is a misconfiguration the user should hear about once, naming the node; it then runs on
CPU, or stops if the stage says GPUs are required (``<stage>.require_gpu``)."""

from __future__ import annotations

import logging
import os
import socket

import torch

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
_warned: set[str] = set()


class HardwareError(PipelineError):
    """A worker did not get the hardware its stage requires."""


def on_cluster(cfg: object) -> bool:
    """This command runs against a Ray cluster (a Ray job sets RAY_ADDRESS; ``ray_address`` names one): its compute
    then runs on the cluster's workers, never in this process, which on a cluster is the job driver on the head."""
    return bool(getattr(cfg, "ray_address", "") or os.environ.get("RAY_ADDRESS"))


def node_label() -> str:
    """This node, as a person would look for it in the cluster's console."""
    return socket.gethostname()


def worker_device(stage: str, gpus: float, require_gpu: bool = False) -> torch.device:
    """``cuda`` when CUDA is here; CPU when no GPU was asked for; CPU with one warning (or ``HardwareError`` under
    ``require_gpu``) when a GPU was asked for and this node has no CUDA device."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if gpus > 0:
        message = (f"{stage}: this worker asked for {gpus:g} GPU(s) ({stage}.gpus_per_worker) but node "
                   f"{node_label()} has no CUDA device (CUDA_VISIBLE_DEVICES="
                   f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})")
        if require_gpu:
            raise HardwareError(f"{message}; {stage}.require_gpu is set")
        if stage not in _warned:
            _warned.add(stage)
            log.warning("%s; running on CPU", message)
            print(f"WARNING {message}; running on CPU", flush=True)
    return torch.device("cpu")
