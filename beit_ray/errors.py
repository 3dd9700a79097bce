"""The error a bad config value raises; the bottom of the package (it imports nothing of it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the dotted field name."""


def check(ok: bool, name: str, message: str) -> None:
    """Raise ConfigError(``name: message``) unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}: {message}")
