"""Typed run configuration: one ``Config`` per run, loaded from YAML plus ``dotted.key=value`` overrides and
validated before any work (an unknown key, a wrong type or an out-of-range value raises ``ConfigError`` naming the
dotted key)."""

from pipeline.config.checks import ConfigError
from pipeline.config.decoder import DECODER_SIZES, DecoderConfig
from pipeline.config.download import DataConfig, DownloadConfig
from pipeline.config.dvae import DVAEConfig
from pipeline.config.prior import ATTENTION_KINDS, PRIOR_SIZES, PriorConfig
from pipeline.config.root import (
    Config,
    absolute_paths,
    apply_overrides,
    diffusion_config,
    load_config,
    parse_override,
    to_dict,
)
from pipeline.config.sample import SampleConfig
from pipeline.config.tokenize import ClipConfig, TokenizeConfig

__all__ = ["ATTENTION_KINDS", "DECODER_SIZES", "PRIOR_SIZES", "ClipConfig", "Config", "ConfigError", "DataConfig",
           "DecoderConfig", "DownloadConfig",
           "DVAEConfig", "PriorConfig", "SampleConfig", "TokenizeConfig", "absolute_paths", "apply_overrides",
           "diffusion_config", "load_config", "parse_override", "to_dict"]
