"""A stage's hardware request against the cluster's node types: cluster/config.yaml's own types, what fits, what
never can (named in the error), and what the autoscaler would add."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.runtime import demand
from pipeline.runtime.devices import HardwareError, worker_device

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def aws_types() -> list[demand.NodeType]:
    path = os.path.join(REPO, "cluster", "config.yaml")
    with open(path) as f:
        return demand.node_types_from_yaml(path, f.read())


def test_cluster_config_node_types_are_read(aws_types):
    by_name = {t.name: t for t in aws_types}
    assert set(by_name) == {"head", "cpu_worker", "gpu_worker"}
    assert by_name["head"].head and by_name["head"].max_workers == 1 and by_name["head"].resources == {"CPU": 0}
    assert by_name["gpu_worker"].resources["GPU"] == 8 and by_name["gpu_worker"].max_workers == 8
    assert by_name["cpu_worker"].resources["download"] == 32


def test_laion_cluster_config_fits_cluster_config(aws_types):
    """Every stage request configs/laion-cluster.yaml makes fits cluster/config.yaml's node types."""
    cfg = load_config(os.path.join(REPO, "configs", "laion-cluster.yaml"))
    assert cfg.tokenize.gpus_per_worker == 1 and cfg.prior.gpus_per_worker == 1 and cfg.dvae.gpus_per_worker == 1
    demand.check("download", {"CPU": cfg.download.task_cpus, **cfg.download.resources}, 1, aws_types, "aws")
    demand.check("tokenize", cfg.tokenize.request(), cfg.tokenize.num_encoders, aws_types, "aws")
    demand.check("prior", cfg.prior.request(), cfg.prior.num_procs, aws_types, "aws")
    demand.check("dvae", cfg.dvae.request(), cfg.dvae.num_procs, aws_types, "aws")
    # The plan an autoscaler would follow: download on cpu workers only, GPU work on GPU workers.
    assert set(demand.launch_plan({"CPU": 1, "download": 1}, 64, aws_types)) == {"cpu_worker"}
    assert demand.launch_plan(cfg.prior.request(), 16, aws_types) == {"gpu_worker": 2}


def test_requests_no_node_type_can_meet_are_refused_naming_key_and_types(aws_types):
    with pytest.raises(ConfigError, match=r"tokenize\.gpus_per_worker.*no node type offers it.*gpu_worker"):
        demand.check("tokenize.gpus_per_worker", {"CPU": 1, "GPU": 16}, 1, aws_types, "cluster/config.yaml")
    with pytest.raises(ConfigError, match=r"download\.resources.*\{CPU: 1, fast_disk: 1\}.*cpu_worker"):
        demand.check("download.resources", {"CPU": 1, "fast_disk": 1}, 1, aws_types, "cluster/config.yaml")
    with pytest.raises(ConfigError, match=r"65 workers .* at most 64"):  # 8 nodes × 8 GPUs
        demand.check("prior.num_procs", {"CPU": 1, "GPU": 1}, 65, aws_types, "cluster/config.yaml")
    demand.check("prior.num_procs", {"CPU": 1, "GPU": 1}, 64, aws_types, "cluster/config.yaml")  # the limit fits


def test_a_cluster_without_autoscaler_offers_the_nodes_that_are_up():
    types = demand.node_types_from_nodes([{"CPU": 2.0, "node:10.0.0.1": 1.0, "memory": 1e9},
                                          {"CPU": 2.0, "node:10.0.0.2": 1.0, "memory": 2e9}])
    assert [(t.resources, t.max_workers) for t in types] == [({"CPU": 2.0}, 2)]
    demand.check("prior.num_procs", {"CPU": 1}, 4, types, "up")
    with pytest.raises(ConfigError, match="no node type offers it"):
        demand.check("prior.gpus_per_worker", {"CPU": 1, "GPU": 1}, 1, types, "up")


def test_a_bad_cluster_config_is_named():
    with pytest.raises(ConfigError, match="x.yaml: no available_node_types"):
        demand.node_types_from_yaml("x.yaml", "provider: {type: aws}\n")


def test_hardware_keys_are_checked():
    for bad, match in [("tokenize.gpus_per_worker=-1", "tokenize.gpus_per_worker"),
                       ("prior.gpus_per_worker=1.5", "whole number"),
                       ("sample.require_gpu=true", "sample.require_gpu"),
                       ("prior.resources={GPU: 1}", "prior.resources.GPU"),
                       ("tokenize.decode_resources={CPU: 2}", "tokenize.decode_resources.CPU")]:
        with pytest.raises(ConfigError, match=match):
            load_config(os.path.join(REPO, "configs", "tiny.yaml"), [bad])


def test_a_gpu_asked_for_on_a_node_without_cuda_warns_or_fails(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU node whose image lacks CUDA
    assert worker_device("sample", 0).type == "cpu"
    assert worker_device("sample", 1).type == "cpu"
    assert "sample: this worker asked for 1 GPU(s)" in capsys.readouterr().out
    with pytest.raises(HardwareError, match="require_gpu"):
        worker_device("sample", 1, require_gpu=True)
