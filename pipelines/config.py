"""The one config system: conf/base.yaml (every knob, documented) < deployment file < key=value.

Errors are raised as ConfigError before any work starts: an unknown key names the key
and the file or argument it came from; a wrong type names the key, the expected type
and the value found.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
BASE = CONF_DIR / "base.yaml"


class ConfigError(ValueError):
    pass


def _check_keys(node: Any, base: Any, where: str, path: str = "") -> None:
    """Every key of `node` must exist in `base`, and hold a value of the same type."""
    if isinstance(base, DictConfig):
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{where}: {path or 'the config'} must be a mapping (like conf/base.yaml), got {node!r}")
        if len(base) == 0:
            return  # an empty mapping in base.yaml is free-form (arguments passed through to a library)
        for key in node.keys():
            full = f"{path}.{key}" if path else str(key)
            if key not in base:
                raise ConfigError(f"{where}: unknown key {full!r} (not in conf/base.yaml)")
            _check_keys(node._get_node(key), base._get_node(key), where, full)
        return
    if not hasattr(node, "_is_interpolation") or node._is_interpolation() or base._is_interpolation():
        return  # checked after resolution, in _check_types
    _check_value(node._value(), base._value(), where, path)


def _check_value(value: Any, default: Any, where: str, path: str) -> None:
    if value is None or default is None:
        return  # null defaults take a string (paths, endpoints) or null
    expected = type(default)
    if expected is float and type(value) is int:
        return
    if type(value) is not expected:
        raise ConfigError(
            f"{where}: {path} must be {expected.__name__} (like {default!r} in conf/base.yaml), "
            f"got {type(value).__name__} {value!r}"
        )


def _check_types(cfg: Any, base: Any, path: str = "") -> None:
    for key in base.keys():
        full = f"{path}.{key}" if path else str(key)
        b, c = base[key], cfg[key]
        if isinstance(b, (DictConfig, dict)):
            _check_types(c, b, full)
        elif not isinstance(b, (ListConfig, list)):
            _check_value(c, b, "resolved config", full)


def _parse_override(arg: str) -> DictConfig:
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not key=value")
    try:
        return OmegaConf.from_dotlist([arg])
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {arg!r}: {e}") from None


def load_config(paths: str | os.PathLike | Sequence[str | os.PathLike] | None,
                overrides: Sequence[str] = ()) -> DictConfig:
    """Base < deployment file(s) `paths`, in order < `overrides` (key=value), checked and resolved.

    Several files layer like overrides: a benchmark's file holds only what it changes
    in the deployment it starts from (conf/bench/data.yaml on conf/demo.yaml).
    """
    base = OmegaConf.load(BASE)
    layers: list[tuple[str, DictConfig]] = []
    if paths is None:
        paths = []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as e:  # yaml errors carry the line; keep them, name the file
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    layers += [(f"override {o!r}", _parse_override(o)) for o in overrides]
    cfg = base
    for where, layer in layers:
        _check_keys(layer, base, where)
        cfg = OmegaConf.merge(cfg, layer)
    run_dir = cfg._get_node("run_dir")._value()
    if isinstance(run_dir, str) and "://" not in run_dir and not os.path.isabs(run_dir):
        # Ray workers (Ray Train's above all) run in folders of their own: a relative
        # run_dir, and every path under it, is taken from where the config is loaded.
        cfg.run_dir = os.path.abspath(run_dir)
    try:
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as e:
        raise ConfigError(f"config could not be resolved: {e}") from None
    _check_types(resolved, OmegaConf.create(OmegaConf.to_container(base, resolve=True)))
    OmegaConf.set_readonly(resolved, True)
    OmegaConf.set_struct(resolved, True)
    return resolved


def plain(node) -> dict:
    """A config section as a plain dict, as ops take it (ops know nothing of OmegaConf)."""
    return OmegaConf.to_container(node, resolve=True)

