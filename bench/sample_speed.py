"""Queries/s of Fusion-Diff sampling: prior + Control-Adapter, N DPM-Solver++ steps, guidance.

The prior's sizes come from the config (conf/demo.yaml's tiny prior by default; add
`--config conf/prod.yaml` for DiT-XL/2), d_VL from models.embedder.dim, the condition
from --cond-dim/--cond-tokens. Random weights with every zero-initialised gate opened,
so the work is the trained model's. Prints one JSON line per batch size and, last,
a summary line with batch 1 and the best batch.

    .venv/bin/python bench/sample_speed.py                                   # tiny, CPU
    python bench/sample_speed.py --config conf/prod.yaml --device cuda --dtype bfloat16 --batches 1 64 128 256
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from model.diffusion import DiffusionConfig, GuidedSampler, SamplerConfig
from model.mllm import torch_dtype
from model.prior import ControlAdapter, FusionDiffPrior


def build(cfg, cond_dim: int, device: str, dtype: str):
    from pipelines.config import plain

    with torch.device(device):  # initialised where it runs: a CPU init of 1.4B parameters takes long
        prior = FusionDiffPrior(d_vl=cfg.models.embedder.dim, cond_dim=cond_dim, **plain(cfg.prior))
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.02 * torch.randn_like(p))
    adapter = ControlAdapter.from_prior(prior)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dt = torch_dtype(dtype)
    return prior.to(device, dt).eval(), adapter.to(device, dt).eval()


def time_batch(sampler, prior, adapter, b: int, cond_tokens: int, cond_dim: int, repeats: int) -> float:
    device, dtype = prior.device, prior.dtype
    c = torch.randn(b, cond_tokens, cond_dim, device=device, dtype=dtype)
    mask = torch.ones(b, cond_tokens, dtype=torch.bool, device=device)
    zq = torch.nn.functional.normalize(torch.randn(b, prior.config.d_vl, device=device), dim=-1).to(dtype)
    sampler.sample(prior, c, mask, adapter, zq)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        sampler.sample(prior, c, mask, adapter, zq)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return b * repeats / (time.perf_counter() - t)


def main() -> None:
    from pipelines.config import plain
    from pipelines.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--cond-dim", type=int, default=64, help="text encoder token size (2048 for T5-XL)")
    ap.add_argument("--cond-tokens", type=int, default=77)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    cfg = load_config(args.config or ["conf/demo.yaml"], args.overrides)
    prior, adapter = build(cfg, args.cond_dim, args.device, args.dtype)
    sampler = GuidedSampler(DiffusionConfig(**plain(cfg.diffusion)), SamplerConfig(**plain(cfg.sampling)))
    n_params = sum(p.numel() for p in prior.parameters()) + sum(p.numel() for p in adapter.parameters())
    results = {}
    for b in args.batches:
        results[b] = time_batch(sampler, prior, adapter, b, args.cond_tokens, args.cond_dim, args.repeats)
        print(json.dumps({"batch": b, "queries_per_s": round(results[b], 2)}), flush=True)
    best = max(results, key=results.get)
    print(json.dumps({"params_m": round(n_params / 1e6, 2), "steps": cfg.sampling.num_steps,
                      "guidance": cfg.sampling.guidance_scale, "device": args.device, "dtype": args.dtype,
                      "batch_1_queries_per_s": round(results.get(1, float("nan")), 2),
                      "best_batch": best, "best_queries_per_s": round(results[best], 2)}))


if __name__ == "__main__":
    main()
