"""The optimiser, learning-rate schedule and step shared by both training stages.

AdamW with the paper's settings, linear warm-up then cosine (Stage 1) or constant
(Stage 2), global gradient-norm clipping (section 7.1). Ray Train's workers and the
synthetic ablation call the same functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class OptimConfig:
    """conf `train_stage1` / `train_stage2` (documented in conf/base.yaml)."""

    lr: float
    weight_decay: float
    adam_eps: float
    grad_clip: float
    warmup_steps: int
    lr_schedule: str
    batch_size: int
    epochs: int


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr,
                             weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule={cfg.lr_schedule!r}: expected 'cosine' or 'constant'")

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total_steps))


def train_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scheduler, params: list[torch.nn.Parameter],
               grad_clip: float) -> float:
    """Backward, clip, step; returns the gradient norm before clipping. A NaN or Inf
    loss raises before the weights are touched."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}: stopping before the weights are updated")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    scheduler.step()
    return float(norm)
