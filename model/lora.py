"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's linear layers, merged for export.

`finetune_embedder` with `finetune_embedder.lora_rank` > 0 trains, for each linear
layer whose name ends in one of `lora_targets`, two small matrices A (r x in) and
B (out x r) beside the frozen weight W: y = W x + (alpha / r) B A x. B starts at zero,
so the adapted model begins as the base model exactly. At export the product is added
into W (`merge_lora`), so that the saved checkpoint is a plain model of the base's
class that `from_pretrained` loads as any other: nothing downstream knows LoRA existed.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        # A as nn.Linear's own init (Kaiming-uniform); B zero, so the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a * self.scale).to(self.base.weight.dtype)
        return self.base


def add_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> list[str]:
    """Freezes `model` and wraps each linear layer whose name ends in a target; returns
    the wrapped layers' names. No layer matched is an error naming the targets."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n.split(".")[-1] == t for t in targets)]
    if not names:
        raise ValueError(f"LoRA: no linear layer of the model is named one of {list(targets)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def merge_lora(model: nn.Module) -> int:
    """Folds every LoRALinear of `model` back into a plain nn.Linear; returns how many."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).merged())
    return len(wrapped)
