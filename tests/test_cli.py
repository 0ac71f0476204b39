import os
import subprocess
import sys

import pytest

from pipeline.cli import STAGES, build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([stage, "--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_config_error_exits_2_naming_the_key(capsys):
    assert main(["tokenize", "--config", os.path.join(REPO, "configs/tiny.yaml"), "tokenize.batch_sise=3"]) == 2
    assert "unknown config key 'tokenize.batch_sise'" in capsys.readouterr().err


@pytest.mark.parametrize("job", ["tokenize", "download", "train_prior"])
def test_job_scripts_take_the_same_arguments(job):
    # jobs/tokenize.py must not shadow the standard library's tokenize module.
    proc = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "dotted.key=value" in proc.stdout


def test_cluster_config_is_a_consistent_ray_up_file():
    import yaml

    cfg = yaml.safe_load(open(os.path.join(REPO, "cluster", "config.yaml")))
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert sum(t.get("max_workers", 0) for t in cfg["available_node_types"].values()) <= cfg["max_workers"]
    assert any("pip install" in c for c in cfg["setup_commands"])
