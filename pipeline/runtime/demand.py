"""What a stage asks the cluster for, checked against what the cluster can ever offer, before any work.

The offer is the node types of the autoscaler's cluster YAML (``available_node_types``: each type's resources and
``max_workers``), or, on a cluster that cannot grow, the nodes that are up. A request no node type can meet would
otherwise leave Ray's tasks pending forever (Ray only logs that they are infeasible); here it stops the stage with
the key to change, the request and the node types. Pure data: the seam (``ray_seam.node_types``) gathers the offer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import yaml

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int
    """Nodes of this type the cluster can have at most (the head: 1)."""
    head: bool = False

    def slots(self, request: dict[str, float]) -> int:
        """Workers of ``request`` one node of this type holds side by side (0: it cannot hold one)."""
        fits = [math.floor(self.resources.get(k, 0.0) / v + 1e-9) for k, v in request.items() if v > 0]
        return min(fits) if fits else 0

    def describe(self) -> str:
        res = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.resources.items()))
        return f"{self.name} ({{{res}}}, up to {self.max_workers})"


def node_types_from_yaml(path: str, text: str) -> list[NodeType]:
    """The node types of a Ray cluster YAML (``ray up``'s format; the head type counts as one node)."""
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cluster_config {path}: not YAML ({exc})") from None
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise ConfigError(f"cluster_config {path}: no available_node_types (is it a Ray cluster YAML?)")
    head, cap = config.get("head_node_type"), int(config.get("max_workers", 10**6))
    out = []
    for name, spec in types.items():
        spec = spec or {}
        resources = {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}
        count = 1 if name == head else min(int(spec.get("max_workers", cap)), cap)
        out.append(NodeType(str(name), resources, count, head=name == head))
    return out


def node_types_from_nodes(nodes: list[dict[str, float]]) -> list[NodeType]:
    """The nodes that are up (each node's total resources), grouped into types by identical resources."""
    groups: dict[tuple, int] = {}
    for res in nodes:
        key = tuple(sorted((k, float(v)) for k, v in res.items() if not k.startswith("node:")
                           and k not in ("memory", "object_store_memory")))
        groups[key] = groups.get(key, 0) + 1
    return [NodeType(f"node{i + 1}" if n == 1 else f"nodes{i + 1}", dict(key), n)
            for i, (key, n) in enumerate(groups.items())]


def check(key: str, request: dict[str, float], count: int, types: list[NodeType], source: str) -> None:
    """``count`` workers of ``request`` each fit on some node type, and together in the nodes the types allow;
    else ``ConfigError`` naming ``key``, the request and the node types (from ``source``)."""
    request = {k: v for k, v in request.items() if v > 0}
    if not request or not types:
        return
    unknown = [t for t in types if not t.resources]  # resources left for the cloud to detect: cannot be refused
    if unknown:
        return
    fitting = [t for t in types if t.slots(request) > 0]
    offered = "; ".join(t.describe() for t in types)
    asked = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(request.items())) + "}"
    if not fitting:
        raise ConfigError(f"{key}: each worker asks for {asked}, and no node type offers it. Node types ({source}): "
                          f"{offered}")
    capacity = sum(t.slots(request) * t.max_workers for t in fitting)
    if count > capacity:
        raise ConfigError(f"{key}: {count} workers of {asked} asked for, the node types that fit hold at most "
                          f"{capacity} (max_workers × workers per node). Node types ({source}): {offered}")


def launch_plan(request: dict[str, float], count: int, types: list[NodeType]) -> dict[str, int]:
    """The nodes of each type an autoscaler would add for ``count`` workers of ``request`` (most workers per node
    first, as Ray's bin-packing does; the head adds none)."""
    request = {k: v for k, v in request.items() if v > 0}
    plan: dict[str, int] = {}
    left = count
    for t in sorted((t for t in types if t.slots(request) > 0 and not t.head), key=lambda t: -t.slots(request)):
        if left <= 0:
            break
        nodes = min(t.max_workers, math.ceil(left / t.slots(request)))
        if nodes:
            plan[t.name] = nodes
            left -= nodes * t.slots(request)
    if left > 0:
        raise ConfigError(f"no node types hold {count} workers of {request}")
    return plan
