"""Queries/s of the rank stage's query op in each run mode, on CPU with the tiny models.

Drives ops/rank.py's QueryOp directly (what each Ray actor runs per batch): the
describer's T~, f_M, the text encoder and guided sampling (14 DPM-Solver++ steps,
CFG) through a randomly initialised tiny prior + adapter. The search is measured by
bench/search_speed.py; the stage as a whole (Ray start-up, actors, lookups,
publish) is in each `[rank]` summary line.

    .venv/bin/python bench/rank_speed.py [--queries 64] [--batch 16]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch


def main() -> None:
    from model.prior import ControlAdapter, FusionDiffPrior
    from ops.rank import QueryOp
    from pipelines.config import RANK_MODES, load_config, plain
    from pipelines.synthetic import ATTRIBUTES, build_demo_models, draw, instruction, random_item

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="rank_bench_")
    cfg = load_config("conf/demo.yaml", [f"run_dir={root}"])
    build_demo_models(cfg)
    torch.manual_seed(0)
    prior = FusionDiffPrior(d_vl=cfg.models.embedder.dim, cond_dim=cfg.tiny_models.t5.d_model, **plain(cfg.prior))
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prior.save_pretrained(f"{root}/prior")
    ControlAdapter.from_prior(prior).save_pretrained(f"{root}/adapter")
    rng = random.Random(0)
    attrs = list(ATTRIBUTES.items())
    images = [draw(random_item(rng), cfg.synthetic.image_size, rng) for _ in range(args.queries)]
    rows = []
    for i in range(args.queries):
        a, vs = attrs[i % len(attrs)]
        rows.append({"query_id": f"q{i}", "query_key": f"{i:064x}", "modification_text": instruction(a, vs[i % len(vs)]),
                     "shared_concept": "shape"})
    summary = {}
    for mode in RANK_MODES:
        c = load_config("conf/demo.yaml", [f"run_dir={root}", f"rank.mode={mode}"])
        op = QueryOp(plain(c), None, {"prior": f"{root}/prior", "adapter": f"{root}/adapter", "expected_prior": {}},
                     None)
        op.vectors(images[:2], rows[:2])  # warm-up
        t = time.perf_counter()
        for s in range(0, args.queries, args.batch):
            op.vectors(images[s:s + args.batch], rows[s:s + args.batch])
        summary[mode] = round(args.queries / (time.perf_counter() - t), 1)
        print(json.dumps({"mode": mode, "queries_per_s": summary[mode]}), flush=True)
    print(json.dumps({"batch": args.batch, "queries": args.queries, "device": "cpu", **summary}))


if __name__ == "__main__":
    main()
