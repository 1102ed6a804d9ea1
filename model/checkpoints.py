"""Loading the prior and the adapter, refusing checkpoints that do not fit the config.

Both are diffusers models: `save_pretrained(dir)` writes config.json and safetensors,
and `FusionDiffPrior.from_pretrained(dir)` loads one in a line. These helpers add the
check that a deployment needs: a checkpoint whose sizes differ from the config is
refused with what was expected and what was found, before any weights are read.
"""
from __future__ import annotations

import inspect
import os

from model.errors import PipelineError
from model.prior import ControlAdapter, FusionDiffPrior


class CheckpointMismatch(PipelineError):
    pass


def prior_config_with_defaults(found: dict) -> dict:
    """A prior's saved config with the fields it predates at their defaults, as
    from_pretrained reads it (prediction_type came after the first checkpoints)."""
    params = inspect.signature(FusionDiffPrior.__init__).parameters.values()
    return {**{p.name: p.default for p in params if p.default is not p.empty}, **found}


def _compare(path: str, found: dict, expected: dict) -> None:
    diff = [(k, v, found.get(k)) for k, v in expected.items() if found.get(k) != v]
    if diff:
        detail = "; ".join(f"{k}: expected {v!r}, found {f!r}" for k, v, f in diff)
        raise CheckpointMismatch(f"checkpoint {path} does not match the config ({detail})")


def load_prior(path: str, expected: dict | None = None, **kwargs) -> FusionDiffPrior:
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointMismatch(f"no prior checkpoint at {path} (config.json missing)")
    found = FusionDiffPrior.load_config(path)
    if found.get("_class_name") != FusionDiffPrior.__name__:
        raise CheckpointMismatch(
            f"checkpoint {path} holds a {found.get('_class_name')}, not a FusionDiffPrior"
        )
    _compare(path, prior_config_with_defaults(found), expected or {})
    return FusionDiffPrior.from_pretrained(path, **kwargs)


def load_adapter(path: str, prior: FusionDiffPrior, **kwargs) -> ControlAdapter:
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointMismatch(f"no Control-Adapter checkpoint at {path} (config.json missing)")
    found = ControlAdapter.load_config(path)
    if found.get("_class_name") != ControlAdapter.__name__:
        raise CheckpointMismatch(
            f"checkpoint {path} holds a {found.get('_class_name')}, not a ControlAdapter"
        )
    expected = {k: v for k, v in dict(prior.config).items() if not k.startswith("_")}
    _compare(path, prior_config_with_defaults(found.get("prior_config") or {}), expected)
    return ControlAdapter.from_pretrained(path, **kwargs)
