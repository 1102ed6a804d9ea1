"""The optimiser, learning-rate schedule and step shared by both training stages.

AdamW with the paper's settings, linear warm-up then cosine (Stage 1) or constant
(Stage 2), global gradient-norm clipping (section 7.1). Ray Train's workers and the
synthetic ablation call the same functions.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Callable, ContextManager, Iterable

import torch
from safetensors.torch import load_file, save_file


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

    @classmethod
    def from_conf(cls, section: dict) -> "OptimConfig":
        """The optimiser's fields of a `train_stage*` section (which also holds run knobs)."""
        return cls(**{f.name: section[f.name] for f in fields(cls)})


def make_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW; `fused` (conf `train.fused_optimizer`) updates every parameter in one kernel
    per step instead of a loop of small ones: the same arithmetic (tests/test_fast_paths.py)."""
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        eps=cfg.adam_eps,
        fused=fused or None,
    )


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


def accumulate_gradients(
    loss_of_rows: Callable[[slice], torch.Tensor],
    rows: int,
    micro_batch: int,
    no_sync: Callable[[], ContextManager] | None = None,
) -> torch.Tensor:
    """Backward of a batch's mean loss, `micro_batch` rows at a time (0: all at once).

    The gradients are those of the whole batch's mean (each part's mean loss weighted
    by its share of rows), with one part's activations in memory at a time: a global
    batch larger than fits on the GPUs (the paper's 4096) trains as the same step.
    `no_sync` (DDP's) holds the gradient all-reduce back until the last part. Returns
    the batch's mean loss, detached.
    """
    size = micro_batch if micro_batch > 0 else rows
    starts = list(range(0, rows, size))
    total = torch.zeros(())
    for i, lo in enumerate(starts):
        hi = min(lo + size, rows)
        hold = no_sync is not None and i < len(starts) - 1
        with no_sync() if hold else contextlib.nullcontext():
            loss = loss_of_rows(slice(lo, hi))
            (loss * ((hi - lo) / rows)).backward()
        total = total.to(loss.device) + loss.detach().float() * ((hi - lo) / rows)
    return total


def apply_step(
    opt: torch.optim.Optimizer, scheduler, params: list[torch.nn.Parameter], grad_clip: float
) -> float:
    """Clip the accumulated gradients, step, clear them; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    scheduler.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


class EMA:
    """An exponential moving average of a model's weights (DiT samples from one).

    The paper does not mention EMA; it is off unless `ema_decay` > 0 in conf.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            k: v.detach().clone().float() for k, v in model.state_dict().items() if v.dtype.is_floating_point
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        model.load_state_dict(
            {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in state.items()}
        )


# Training state on disk: tensors in safetensors (never pickles: loading one can run code), the rest
# in JSON. The model itself is saved with save_pretrained beside it.
OPTIMIZER_FILE = "optimizer.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.json"


def save_training_state(
    path: str, opt: torch.optim.Optimizer, scheduler, ema: EMA | None, state: dict
) -> None:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, OPTIMIZER_FILE))
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.shadow.items()}, os.path.join(path, EMA_FILE))
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump(
            {
                **state,
                "optimizer_param_groups": sd["param_groups"],
                "optimizer_scalars": scalars,
                "scheduler": scheduler.state_dict(),
            },
            f,
        )


def load_training_state(path: str, opt: torch.optim.Optimizer, scheduler, ema: EMA | None) -> dict:
    """Restores the optimiser, scheduler and EMA saved by save_training_state; returns the
    rest of the saved state (step, epoch, metrics...)."""
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(path, OPTIMIZER_FILE))
    slots: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(state.pop("optimizer_scalars").items()):
        idx, name = key.split(".", 1)
        slots.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": slots, "param_groups": state.pop("optimizer_param_groups")})
    scheduler.load_state_dict(state.pop("scheduler"))
    if ema is not None and os.path.exists(os.path.join(path, EMA_FILE)):
        ema.shadow = {k: v.float() for k, v in load_file(os.path.join(path, EMA_FILE)).items()}
    return state
