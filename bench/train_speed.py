"""Training samples/s of a Stage 1 step (forward + backward + AdamW) through model/ directly.

The same functions the Ray Train worker calls (diffusion_loss, accumulate_gradients in
parts of --micro-batch rows, apply_step: pipelines/train.py train_loop), on random
inputs: the tiny prior of conf/demo.yaml on CPU by default, or DiT-XL/2 with
`--config conf/prod.yaml --device cuda --autocast-bf16` (the paper's setting: bf16
autocast, fp32 master weights). Prints one JSON line per batch size, then a summary.
Ray Train's own samples/s, with data loading and the text encoder, are in each run's
metrics.jsonl (`samples_per_s`).

    .venv/bin/python bench/train_speed.py                                     # tiny, CPU
    python bench/train_speed.py --config conf/prod.yaml --device cuda --autocast-bf16 --cond-dim 2048 --batches 32 64
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from model.diffusion import DiffusionConfig, ddpm_scheduler, diffusion_loss
from model.prior import FusionDiffPrior
from model.training import OptimConfig, accumulate_gradients, apply_step, make_optimizer, make_scheduler


def time_batch(prior, diffusion, optim, b: int, cond_tokens: int, cond_dim: int, steps: int, autocast: bool,
               fused: bool = False, micro_batch: int = 0, profile=None) -> dict:
    """Samples/s of `steps` training steps at batch b (after one warm-up step; a
    compiled prior compiles there). `fused`: conf train.fused_optimizer. `profile`: a
    function of the step whose dict (bench/gpu.py's top operators) joins the figures."""
    device = prior.device
    params = [p for p in prior.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim, fused=fused)
    sched = make_scheduler(opt, optim, 10 ** 6)
    noise = ddpm_scheduler(diffusion)
    z0 = torch.nn.functional.normalize(torch.randn(b, prior.config.d_vl, device=device), dim=-1)
    c = torch.randn(b, cond_tokens, cond_dim, device=device)
    m = torch.ones(b, cond_tokens, dtype=torch.bool, device=device)

    def loss_of_rows(rows: slice) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            return diffusion_loss(prior, diffusion, z0[rows], c[rows], m[rows], scheduler=noise)

    def step():
        accumulate_gradients(loss_of_rows, b, micro_batch)
        apply_step(opt, sched, params, optim.grad_clip)

    step()  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"batch": b, "samples_per_s": round(b * steps / (time.perf_counter() - t), 2)}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    if profile is not None:
        out.update(profile(step))
    return out


def main() -> None:
    from pipelines.config import load_config, plain

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--cond-dim", type=int, default=64, help="text encoder token size (2048 for T5-XL)")
    ap.add_argument("--cond-tokens", type=int, default=77)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast-bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=0, help="train.micro_batch_size: rows per forward (0: all)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    cfg = load_config(args.config or ["conf/demo.yaml"], args.overrides)
    prior = FusionDiffPrior(d_vl=cfg.models.embedder.dim, cond_dim=args.cond_dim, **plain(cfg.prior)).to(args.device)
    diffusion = DiffusionConfig(**plain(cfg.diffusion))
    optim = OptimConfig.from_conf(plain(cfg.train_stage1))
    results = []
    for b in args.batches:
        results.append(time_batch(prior, diffusion, optim, b, args.cond_tokens, args.cond_dim, args.steps,
                                  args.autocast_bf16, micro_batch=args.micro_batch))
        print(json.dumps(results[-1]), flush=True)
    best = max(results, key=lambda r: r["samples_per_s"])
    print(json.dumps({"params_m": round(sum(p.numel() for p in prior.parameters()) / 1e6, 2),
                      "device": args.device, "autocast_bf16": args.autocast_bf16, "cond_tokens": args.cond_tokens,
                      "best_batch": best["batch"], "best_samples_per_s": best["samples_per_s"]}))


if __name__ == "__main__":
    main()
