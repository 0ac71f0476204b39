import pytest

from pipeline.config import ConfigError, load_config, parse_override


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "prior:\n  n_layer: 3\n"), ["prior.n_embd=64", "download.input=s3://b/x.parquet"])
    assert cfg.prior.n_layer == 3 and cfg.prior.n_embd == 64
    assert cfg.download.input == "s3://b/x.parquet"
    assert cfg.path("tokens").endswith("runs/demo/tokens")


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'prior.n_layr'"):
        load_config(write(tmp_path, "prior:\n  n_layr: 3\n"))
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(None, ["bogus=1"])


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'dvae.steps': expected an integer, got 'many'"):
        load_config(write(tmp_path, "dvae:\n  steps: many\n"))
    with pytest.raises(ConfigError, match="'download.allow_private_addresses': expected true or false"):
        load_config(None, ["download.allow_private_addresses=3"])
    with pytest.raises(ConfigError, match="'prior': expected a mapping"):
        load_config(None, ["prior=7"])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match="'prior.n_embd': must be divisible by prior.n_head"):
        load_config(None, ["prior.n_embd=100", "prior.n_head=3"])
    with pytest.raises(ConfigError, match="'prior.zero_stage'"):
        load_config(None, ["prior.zero_stage=4"])
    with pytest.raises(ConfigError, match="'dvae.vocab_size'"):
        load_config(None, ["dvae.vocab_size=70000"])
    with pytest.raises(ConfigError, match=r"'download.encode_quality': must be in \[0, 9\] for png"):
        load_config(None, ["download.encode_format=png"])  # 95, the jpg default, fails every shard task otherwise
    for procs in (1, 2):  # the sign is the fault, whatever the rank count
        with pytest.raises(ConfigError, match="'dvae.batch_size': must be > 0"):
            load_config(None, ["dvae.batch_size=-1", f"dvae.num_procs={procs}"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="bad override 'prior.steps': expected dotted.key=value"):
        parse_override("prior.steps")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("prior..steps=3")
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["seed=1", "seed.x=2"])


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_shipped_configs_load():
    for name in ("demo", "tiny"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.prior.num_procs == 2 and cfg.prior.zero_stage == 2
