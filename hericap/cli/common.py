"""What every command shares: loading a config from overrides, exit codes, the help line."""

from __future__ import annotations

from collections.abc import Sequence

from hericap.config.loader import list_presets, load_config
from hericap.config.schema import Config

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "config_from", "overrides_help"]

# The shell's exit status for "stopped by Ctrl-C" (128 + SIGINT).
EXIT_INTERRUPTED = 130
# A configuration or input the user can fix (the message says how).
EXIT_USER_ERROR = 2


def config_from(overrides: Sequence[str], default_preset: str) -> Config:
    """The config of ``overrides`` (``preset=NAME`` among them, else ``default_preset``)."""
    has_preset = any(o.split("=", 1)[0] == "preset" for o in overrides)
    return load_config(overrides, preset=None if has_preset else default_preset)


def overrides_help() -> str:
    return f"key=value overrides; preset=NAME picks one of {list_presets()}"
