"""Enumerations a checkpoint's config holds, in a module without torch: the config
loader (pipelines/config.py) checks a deployment's values against the same tuples the
models accept, without loading torch for every config it reads."""
from __future__ import annotations

# What the prior's output means: "epsilon", the noise (fusion-diff eqs. 3 and 16), or
# "sample", z_0 (DALL-E 2's prior); conf/base.yaml `prior.prediction_type`.
PREDICTION_TYPES = ("epsilon", "sample")
