"""The error type and check helper every config section uses."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key."""


def check(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {why}")
