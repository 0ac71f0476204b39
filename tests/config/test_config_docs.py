"""The self-documenting CLI: every key documented from the dataclasses, each stage's --help lists what it reads,
`config` prints the resolved YAML and `--keys` every key, and the usage line names the command that was typed."""

import os
import subprocess
import sys

import pytest
import yaml

from pipeline.cli import STAGES, build_parser, main
from pipeline.config import Config, load_config, to_dict
from pipeline.config.docs import STAGE_SECTIONS, describe, field_docs, stage_keys, to_yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def test_every_config_key_has_a_docstring():
    keys = describe()
    assert len(keys) > 150  # every section expanded, not just the root
    missing = [k.key for k in keys if not k.doc.strip()]
    assert not missing, f"config keys without a docstring (add one under the field): {missing}"


def test_inherited_fields_keep_their_base_docstring():
    from pipeline.config import DecoderConfig

    # DecoderConfig only changes micro_batch_size's default; the text is EngineConfig's
    assert "Rows per rank" in field_docs(DecoderConfig)["micro_batch_size"]
    by_key = {k.key: k for k in describe()}
    assert by_key["decoder.micro_batch_size"].default == 16 and by_key["prior.micro_batch_size"].default == 32
    assert by_key["diffusion.kind"].default == "diffusion"
    assert by_key["download.resources"].type == "dict[str, float]"


def test_every_command_with_a_config_names_its_sections():
    sections = {f for f in Config.__dataclass_fields__ if "." not in f}
    for stage in STAGES:
        if stage in ("plan", "demo", "config"):
            continue
        assert stage in STAGE_SECTIONS, stage
        assert set(STAGE_SECTIONS[stage]) <= sections, stage


def test_tokenize_help_lists_its_keys_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser("dalle-pipeline").parse_args(["tokenize", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dalle-pipeline tokenize")
    assert "  tokenize.batch_size: int = 64\n      Images encoded per forward pass" in out
    assert "  dvae.weights: str = ''" in out and "  run_dir: str = runs/demo" in out
    assert "  clip.model: str" in out
    assert "prior.n_embd" not in out  # tokenize does not read the prior's keys
    docs = {k.key for ks in stage_keys("tokenize").values() for k in ks}
    assert all(f"  {k}: " in out for k in docs)


def test_unknown_stage_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["tokenise", "--help"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tokenise'" in err and "tokenize" in err and "train-prior" in err


def test_config_prints_the_resolved_yaml(capsys):
    assert main(["config", "--config", TINY, "tokenize.batch_size=7", "prior.size=tiny"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    want = to_dict(load_config(TINY, ["tokenize.batch_size=7", "prior.size=tiny"]))
    assert printed == want
    assert printed["tokenize"]["batch_size"] == 7 and printed["prior"]["n_embd"] == 128  # size resolved
    assert load_config(None, []) == Config()
    # what a training run records as config.yaml is the same text
    assert to_yaml(load_config(TINY, ["tokenize.batch_size=7", "prior.size=tiny"])) == yaml.safe_dump(
        want, sort_keys=False)


def test_config_with_a_bad_key_fails_like_every_stage(capsys):
    assert main(["config", "--config", TINY, "tokenize.batch_sise=3"]) == 2
    assert "unknown config key 'tokenize.batch_sise'" in capsys.readouterr().err
    assert main(["config", "--config", TINY, "prior.n_embd=100", "prior.n_head=3"]) == 2
    assert "prior.n_embd" in capsys.readouterr().err


def test_config_keys_lists_every_key(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for k in describe():
        assert f"  {k.key}: {k.type} = " in out, k.key


def test_usage_names_the_typed_command():
    env = {**os.environ, "PYTHONPATH": REPO}
    module = subprocess.run([sys.executable, "-m", "pipeline", "export", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert module.returncode == 0, module.stderr
    assert module.stdout.startswith("usage: python -m pipeline export")
    # what the dalle-pipeline console script runs: sys.argv[0] is the script's path
    script = "import sys; sys.argv[0] = '/usr/local/bin/dalle-pipeline'; from pipeline.cli import main; main()"
    console = subprocess.run([sys.executable, "-c", script, "export", "--help"], cwd=REPO, env=env,
                             capture_output=True, text=True)
    assert console.returncode == 0, console.stderr
    assert console.stdout.startswith("usage: dalle-pipeline export")
    job = subprocess.run([sys.executable, "jobs/tokenize.py", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert job.stdout.startswith("usage: jobs/tokenize.py tokenize") and "tokenize.num_encoders: int = 1" in job.stdout
