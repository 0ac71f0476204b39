"""Typed run configuration, loaded from YAML plus ``dotted.key=value`` overrides.

Every stage reads one ``Config``. Validation happens here, before any work starts: an unknown key, a value of the
wrong type or a value out of range raises ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.checks import ConfigError
from pipeline.config.checks import check as _check
from pipeline.config.curate import CurateConfig
from pipeline.config.decoder import DecoderConfig
from pipeline.config.download import DataConfig, DownloadConfig
from pipeline.config.dvae import DVAEConfig
from pipeline.config.prior import PriorConfig
from pipeline.config.sample import SampleConfig
from pipeline.config.tokenize import ClipConfig, TokenizeConfig
from pipeline.config.tracking import LoggingConfig
from pipeline.storage.commit import join


@dataclass
class Config:
    run_dir: str = "runs/demo"
    """Folder (local path or s3:// URL) every stage's output goes under unless its own output key is set."""
    seed: int = 0
    """Seed of every random choice the run makes (initialisation, shuffles, sampling) unless a section has its own."""
    ray_address: str = ""
    """Empty: start a local Ray cluster; 'auto' or an address: join that cluster."""
    num_cpus: int = 2
    """CPUs for a local Ray cluster."""
    cluster_config: str = ""
    """The autoscaler's cluster YAML (node types and their resources) that each stage's hardware request is checked
    against before any work; empty: the head's ~/ray_bootstrap_config.yaml (written by `ray up`) if present, else
    the nodes that are up (a cluster without an autoscaler cannot grow)."""
    data: DataConfig = field(default_factory=DataConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    diffusion: PriorConfig = field(default_factory=lambda: PriorConfig(kind="diffusion"))
    """The demo's second prior (DALL-E 2's), trained after the autoregressive one into <run_dir>/prior_diffusion.
    Outside the demo, train one with `train-prior prior.kind=diffusion`."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """DALL-E 2's decoder (CLIP image embedding → pixels), trained into <run_dir>/decoder."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    """Near-duplicates (`dedup`, a side table in <tokens>/_dedup) and published embeddings in (`import-embeddings`)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Experiment tracking: `logging.wandb` streams every trainer's scalars and images to Weights & Biases."""

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir", "must not be empty")
        _check(self.num_cpus > 0, "num_cpus", "must be > 0")

    def path(self, stage: str) -> str:
        """The output location of a stage: its ``output`` key if set, else ``<run_dir>/<default name>``."""
        explicit = {"images": self.download.output, "dvae": self.dvae.output, "clip": self.clip.output,
                    "tokens": self.tokenize.output, "prior": self.prior.output, "report": self.sample.output,
                    "prior_diffusion": self.diffusion.output, "decoder": self.decoder.output,
                    "clip_retrieval": self.tokenize.export}
        if stage == "tokens_input":
            return self.tokenize.input or self.path("images")
        if explicit.get(stage):
            return explicit[stage]
        return join(self.run_dir, stage)


def diffusion_config(cfg: Config) -> Config:
    """``cfg`` with its ``diffusion`` section as the prior to train/evaluate (output <run_dir>/prior_diffusion)."""
    section = dataclasses.replace(cfg.diffusion, kind="diffusion", output=cfg.path("prior_diffusion"))
    return dataclasses.replace(cfg, prior=section)


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every local path absolute (URLs unchanged): workers elsewhere (Ray Train, Ray tasks under a job's
    working_dir) run in their own folders."""

    def fix(v: str) -> str:
        return os.path.abspath(v) if v and "://" not in v else v

    rep = dataclasses.replace
    return rep(cfg, run_dir=fix(cfg.run_dir), download=rep(cfg.download, output=fix(cfg.download.output)),
               dvae=rep(cfg.dvae, output=fix(cfg.dvae.output)), clip=rep(cfg.clip, output=fix(cfg.clip.output)),
               tokenize=rep(cfg.tokenize, output=fix(cfg.tokenize.output)),
               prior=rep(cfg.prior, output=fix(cfg.prior.output)),
               decoder=rep(cfg.decoder, output=fix(cfg.decoder.output)),
               sample=rep(cfg.sample, output=fix(cfg.sample.output), checkpoint=fix(cfg.sample.checkpoint),
                          diffusion_checkpoint=fix(cfg.sample.diffusion_checkpoint),
                          decoder_checkpoint=fix(cfg.sample.decoder_checkpoint),
                          variations=[fix(v) for v in cfg.sample.variations]))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{key} key"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known keys here: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (['a', 'b'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"bad override '{text}': expected dotted.key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"bad override '{text}': value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad override '{text}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (if given), apply overrides, validate every key. Raises ConfigError before any work."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        raw = loaded
    raw = apply_overrides(raw, overrides or [])
    try:
        return _build(Config, raw)
    except TypeError as exc:  # e.g. a section given a scalar
        raise ConfigError(str(exc)) from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
