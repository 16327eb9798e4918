"""Load a :class:`~hericap.config.schema.Config` from a preset plus dotted overrides.

Overrides are written exactly as in the seed's Hydra commands (``optimizer.batch_size=32``,
``split='test'``). Every key is checked against the schema before anything is merged, so a typo
fails with the nearest valid keys instead of being ignored; a value of the wrong type fails with
the key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Sequence
from importlib import resources
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hericap.config.schema import Config

__all__ = [
    "ConfigError",
    "NotEnoughResourcesError",
    "list_presets",
    "load_config",
    "to_dict",
    "valid_keys",
]

logger = logging.getLogger(__name__)

_PRESET_PACKAGE = "hericap.config.presets"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


class NotEnoughResourcesError(RuntimeError):
    """A run asks for more than the Ray cluster has (GPUs); the message says what exists and
    how to run instead. A user error: the CLI reports it without a traceback."""


def list_presets() -> list[str]:
    """Names of the presets shipped in ``hericap/config/presets``."""
    files = resources.files(_PRESET_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def valid_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``optimizer.batch_size``."""
    keys: list[str] = []
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys.extend(valid_keys(type(default), prefix=f"{name}."))
        else:
            keys.append(name)
    return keys


def _group_keys() -> set[str]:
    groups = set()
    for key in valid_keys():
        parts = key.split(".")
        for i in range(1, len(parts)):
            groups.add(".".join(parts[:i]))
    return groups


# Research-code keys that HeriCap spells differently: setting one says where it went.
MOVED_KEYS = {
    "model.beam_size": "decode.test_beam_size (and decode.val_beam_size)",
    "model.beam_len": "decode.max_len",
    "model.max_len": "dataset.max_caption_len",
}


def _check_key(key: str, where: str) -> None:
    keys = valid_keys()
    if key in keys:
        return
    if key in MOVED_KEYS:
        raise ConfigError(f"{where}: '{key}' is spelled {MOVED_KEYS[key]} in HeriCap")
    if key in _group_keys():
        raise ConfigError(
            f"{where}: '{key}' is a group, not a value; set one of its keys, e.g. "
            f"{[k for k in keys if k.startswith(key + '.')][:5]}"
        )
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f" Did you mean {close}?" if close else ""
    group = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in keys if group and k.startswith(group + ".")]
    listing = f" Valid keys in '{group}': {siblings}." if siblings else ""
    raise ConfigError(f"{where}: unknown config key '{key}'.{hint}{listing}")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, prefix=f"{name}."))
        else:
            flat[name] = v
    return flat


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value "
                "(for example optimizer.batch_size=32)"
            )
        key, value = item.split("=", 1)
        key = key.strip().lstrip("+")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        parsed.append((key, value))
    return parsed


def expected_type(key: str, schema: type = Config) -> str | None:
    """The annotated type of a dotted key in the schema, as written (e.g. ``int``)."""
    node: type = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        f = fields[part]
        if i == len(parts) - 1:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if f.default_factory is dataclasses.MISSING:
            return None
        node = type(f.default_factory())
    return None


def _merge(base, update, where: str):
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        expected = expected_type(key)
        type_hint = f" (expected {expected})" if expected else ""
        reason = str(e.msg).splitlines()[0] if e.msg else str(e)
        raise ConfigError(f"{where}: bad value for '{key}'{type_hint}: {reason}") from e


def _preset_chain(name: str) -> list[tuple[str, dict[str, Any]]]:
    """``name`` and the presets it ``extends``, base first, each as ``(name, keys)`` with its
    keys (without ``extends``) checked against the schema. Each file is read once."""
    chain: list[tuple[str, dict[str, Any]]] = []
    presets = list_presets()
    while name:
        if name not in presets:
            raise ConfigError(f"unknown preset '{name}'; available presets: {presets}")
        if any(name == n for n, _ in chain):
            raise ConfigError(f"preset '{name}' extends itself: {[*(n for n, _ in chain), name]}")
        text = resources.files(_PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
        tree = OmegaConf.to_container(OmegaConf.create(text)) or {}
        parent = tree.pop("extends", None)
        for key in _flatten(tree):
            _check_key(key, where=f"preset '{name}'")
        chain.append((name, tree))
        name = parent
    return chain[::-1]


def load_config(
    overrides: Sequence[str] = (),
    preset: str | None = None,
    validate: bool = True,
    base: Config | None = None,
) -> Config:
    """Build a validated :class:`Config`.

    Args:
        overrides: dotted ``key=value`` strings, as on the command line. ``preset=NAME`` among
            them selects the preset (same as the ``preset`` argument).
        preset: preset name; defaults to the schema default (``coco``).
        validate: run the schema's cross-field checks.
        base: start from this config instead of a preset (e.g. a checkpoint's own config).

    Returns:
        The typed configuration.

    Raises:
        ConfigError: unknown key, wrong type, unknown preset or a failed cross-field check.
    """
    parsed = _parse_overrides(overrides)
    for key, value in parsed:
        if key == "preset":
            preset = value.strip("'\"")
    if base is not None:
        cfg = OmegaConf.structured(base)
    else:
        preset = preset or Config.preset
        cfg = OmegaConf.structured(Config)
        for name, tree in _preset_chain(preset):
            cfg = _merge(cfg, tree, where=f"preset '{name}'")
        cfg.preset = preset

    for key, _ in parsed:
        _check_key(key, where="command line")
    dotlist = [f"{k}={v}" for k, v in parsed if k != "preset"]
    try:
        update = OmegaConf.from_dotlist(dotlist)
    except OmegaConfBaseException as e:
        raise ConfigError(f"command line: cannot parse overrides {dotlist}: {e}") from e
    cfg = _merge(cfg, update, where="command line")

    try:
        obj: Config = OmegaConf.to_object(cfg)  # resolves ${oc.env:...} interpolations
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve config: {e}") from e
    if validate:
        try:
            obj.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return obj


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of a config (JSON/YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config saved with :func:`to_dict` (e.g. from a checkpoint), strictly."""
    for key in _flatten(tree):
        _check_key(key, where="saved config")
    cfg = _merge(OmegaConf.structured(Config), tree, where="saved config")
    return OmegaConf.to_object(cfg)
