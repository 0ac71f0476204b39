"""The error type and check helper every config section uses."""

from __future__ import annotations

from pipeline.errors import ConfigError

__all__ = ["ConfigError", "check"]


def check(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {why}")
