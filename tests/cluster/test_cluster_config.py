"""The Ray cluster configs (cluster/*.yaml) pass Ray's own cluster-config validation, offline.

prepare_config fills in Ray's provider defaults (for `local`, it also rewrites the config into its single node
type) and validate_config checks the result against Ray's ray-schema.json plus its cross-field rules. Neither
contacts a cloud: the AWS bootstrap step of `ray up` (key pairs, IAM, subnets) is deliberately not run.
"""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

util = pytest.importorskip("ray.autoscaler._private.util")

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
CONFIGS = ["config.yaml", "onprem.yaml"]
# Instance families that carry NVIDIA GPUs.
GPU_FAMILIES = ("p3", "p4d", "p4de", "p5", "p5e", "g4dn", "g5", "g6", "g6e")


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_validates(name):
    prepared = util.prepare_config(_load(name))
    util.validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config
    for node_type in prepared["available_node_types"].values():
        assert "min_workers" in node_type and "max_workers" in node_type


@pytest.mark.parametrize("name", CONFIGS)
def test_no_credentials_in_file(name):
    text = (CLUSTER / name).read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    assert not re.search(r"aws_(secret_access_key|access_key_id|session_token)", text, re.I)
    assert "PRIVATE KEY" not in text


@pytest.mark.parametrize("name", CONFIGS)
def test_installs_project_on_every_node(name):
    cfg = _load(name)
    assert cfg["file_mounts"] == {"~/dalle-pipeline": "."}
    installs = [c for c in cfg["setup_commands"] if "pip install" in c and "-e ~/dalle-pipeline" in c]
    assert installs and all("constraints.txt" in c for c in installs)


def test_aws_node_types():
    cfg = _load("config.yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node_type in types.items():
        if name == cfg["head_node_type"]:
            continue
        assert isinstance(node_type.get("min_workers"), int), name
        assert isinstance(node_type.get("max_workers"), int), name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cfg["max_workers"], name
        assert "IamInstanceProfile" in node_type["node_config"], name
    gpu = types["gpu_worker"]
    family = gpu["node_config"]["InstanceType"].split(".")[0]
    assert gpu["resources"].get("GPU", 0) > 0 or family in GPU_FAMILIES
    cpu = types["cpu_worker"]
    # Shard tasks ask for the resource configs/laion-cluster.yaml names; only download nodes have it, one unit
    # per vCPU, and the in-flight cap fills every such node at max_workers.
    run_cfg = load_config(CLUSTER.parent / "configs" / "laion-cluster.yaml")
    assert run_cfg.download.resources == {"download": 1.0}
    assert [t for t, spec in types.items() if spec.get("resources", {}).get("download")] == ["cpu_worker"]
    assert cpu["resources"]["download"] == cpu["resources"]["CPU"]
    assert run_cfg.download.max_in_flight >= cpu["max_workers"] * cpu["resources"]["download"]
    # Per-type worker_setup_commands replace the global ones, so the download workers must repeat the install
    # and add the caching resolver.
    cmds = cpu["worker_setup_commands"]
    assert all(c in cmds for c in cfg["setup_commands"])
    assert any("unbound" in c for c in cmds)
    assert "IamInstanceProfile" in types["head"]["node_config"]
