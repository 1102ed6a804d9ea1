"""How much memory a checkpoint's weights take, read from its config alone (no weights
loaded), and the refusal of a model that cannot fit where it is about to be loaded.

Qwen2.5-VL-72B-Instruct in bfloat16 is ~147 GB: on one 80 GB GPU it fails minutes into
loading with CUDA's out-of-memory; refused here first, with what would fit.
"""
from __future__ import annotations

import torch

from model.errors import PipelineError

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


def parameter_count(name_or_path: str, kind: str = "mllm") -> int:
    """Parameters of the model a checkpoint's config describes, counted on the meta
    device (nothing allocated). kind: "mllm" (image-text-to-text) or "t5" (encoder)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, T5EncoderModel

    config = AutoConfig.from_pretrained(name_or_path)
    with torch.device("meta"):
        if kind == "t5":
            model = T5EncoderModel(config)
        else:
            model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def weights_bytes(name_or_path: str, dtype: str, kind: str = "mllm") -> int:
    if dtype not in _BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(_BYTES)}")
    return parameter_count(name_or_path, kind) * _BYTES[dtype]


def check_fits(what: str, need_bytes: int, gpus: int, gib_per_gpu: float, fix: str) -> None:
    """Refuses `what` (needing need_bytes) on `gpus` GPUs of gib_per_gpu each."""
    have = gpus * gib_per_gpu * GIB
    if need_bytes > have:
        fewest = int(-(-need_bytes // (gib_per_gpu * GIB)))
        raise PipelineError(
            f"{what} needs {need_bytes / GIB:.1f} GiB but gets {gpus} GPU(s) of {gib_per_gpu:.0f} GiB "
            f"({have / GIB:.0f} GiB); it needs at least {fewest} such GPUs: {fix}"
        )


def visible_gpu_gib() -> tuple[int, float]:
    """(GPUs this process sees, GiB of the smallest): what a Ray actor was given."""
    n = torch.cuda.device_count()
    if n == 0:
        return 0, 0.0
    return n, min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / GIB
