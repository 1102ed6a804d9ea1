"""How far the demo's table moves with the training stages' draws alone: Stage 1 and
Stage 2 trained again on a finished demo's world and data with other `train.seed`s
(initial weights, batch order, diffusion noise), each pair benchmarked as the demo
benchmarks its own, and the Table 3 gaps read on every draw.

    .venv/bin/python bench/training_draws.py RUN_DIR [SEED ...] [--stage2-only] [--tag NAME] [key=value ...]

(default seeds: 1 2 3). RUN_DIR is a finished `make demo` run folder (runs/demo): its
lake, its world models and its fine-tuned embedder are reused as they are (the
embedder, and so `query_only` and `joint`, keep the demo's draws). Each seed trains
under its own run names and model folders (`stage1_s<seed>`, `prior_s<seed>`; a rerun
resumes the finished runs), and writes its table to `<RUN_DIR>/eval_s<seed>/`. The
demo's own table (`<RUN_DIR>/eval/results.json`, the run's seed) is the first row.
Prints each draw's R@1 and R@10 per mode, then per mode the mean and range, and the
gaps `full - query_only` and `query_only - prior_only` on every draw; ends with a JSON
record. Runs the project's command line, one process per stage (about 3 minutes a seed
on 2 CPU cores).

A variant of the training: `key=value` overrides go to every stage and the benchmark
(`seed=1` for a demo run with `seed=1`, a setting such as `train_stage2.ema_decay=0.99`),
and `--tag NAME` keeps its runs, models and tables apart (`stage1_<NAME>_s<seed>`,
`eval_<NAME>_s<seed>`); a tagged variant's draws are only the seeds given (the demo's
table is printed as the baseline, outside the spread). `--stage2-only` trains Stage 2
alone on the demo's own Stage 1 prior, so `prior_only` keeps the demo's draw too (its
tag is `stage2only` unless one is given).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODES = ("full", "query_only", "prior_only", "joint")
METRICS = ("R@1", "R@10")
GAPS = (("full", "query_only"), ("query_only", "prior_only"))


def draw_name(seed: int, tag: str = "") -> str:
    return f"{tag}_s{seed}" if tag else f"s{seed}"


def overrides(run_dir: str, seed: int, tag: str = "", stage2_only: bool = False, extra: tuple = ()) -> list[str]:
    models = os.path.join(run_dir, "lake", "models")
    name = draw_name(seed, tag)
    stage1 = [] if stage2_only else [f"train_stage1.run_name=stage1_{name}", f"train_stage1.output={models}/prior_{name}"]
    return [f"run_dir={run_dir}", *extra, f"train.seed={seed}", *stage1,
            f"train_stage2.run_name=stage2_{name}", f"train_stage2.output={models}/adapter_{name}"]


def train_and_benchmark(run_dir: str, seed: int, tag: str = "", stage2_only: bool = False, extra: tuple = ()) -> dict:
    """One draw's results.json (each mode's metrics), trained and benchmarked if missing."""
    out_dir = os.path.join(run_dir, f"eval_{draw_name(seed, tag)}")
    found = os.path.join(out_dir, "results.json")
    if not os.path.exists(found):
        cli = [sys.executable, "-m", "pipelines"]
        args = overrides(run_dir, seed, tag, stage2_only, extra)
        for stage in ("train_stage2",) if stage2_only else ("train_stage1", "train_stage2"):
            subprocess.run([*cli, stage, "--config", "conf/demo.yaml", *args], check=True)
        subprocess.run([*cli, "benchmark", "--config", "conf/demo.yaml", "--config", "conf/eval/demo_cirr.yaml",
                        *args, "eval.base_embedder_modes=[]", f"eval.out_dir={out_dir}"], check=True)
    with open(found) as f:
        return json.load(f)


def row(table: dict) -> str:
    return ", ".join(f"{mode} {table[mode]['R@1']:.1f}/{table[mode]['R@10']:.1f}" for mode in MODES)


def spread(values: list[float]) -> dict:
    return {"values": values, "mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values)}


def summary(draws: dict[str, dict]) -> dict:
    """Per mode and metric the draws' values, mean, min and max; the same per gap."""
    return {
        "modes": {f"{mode} {m}": spread([d[mode][m] for d in draws.values()]) for mode in MODES for m in METRICS},
        "gaps": {f"{a} - {b} {m}": spread([round(d[a][m] - d[b][m], 2) for d in draws.values()])
                 for a, b in GAPS for m in METRICS},
    }


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    parser = argparse.ArgumentParser(prog="bench/training_draws.py", add_help=False)
    parser.add_argument("run_dir")
    parser.add_argument("--stage2-only", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("rest", nargs="*")
    args, unknown = parser.parse_known_args(argv)
    rest = args.rest + unknown
    run_dir = os.path.abspath(args.run_dir)
    stage2_only = args.stage2_only
    tag = args.tag or ("stage2only" if stage2_only else "")
    extra = tuple(a for a in rest if "=" in a)
    try:
        seeds = [int(a) for a in rest if "=" not in a] or [1, 2, 3]
    except ValueError:
        print(f"seeds are integers, overrides key=value: got {rest}")
        return 2
    own = os.path.join(run_dir, "eval", "results.json")
    if not os.path.exists(own):
        print(f"no demo table at {own}: run `make demo` first (RUN_DIR is its run folder)")
        return 2
    with open(own) as f:
        baseline = json.load(f)
    draws = {} if tag else {"the run's seed": baseline}
    if tag:
        print(f"the demo's own table (baseline): {row(baseline)}")
    for seed in seeds:
        draws[f"train.seed={seed}"] = train_and_benchmark(run_dir, seed, tag, stage2_only, extra)
    for name, d in draws.items():
        print(f"{name}: {row(d)}")
    s = summary(draws)
    for key, v in {**s["modes"], **s["gaps"]}.items():
        print(f"{key}: mean {v['mean']:.2f}, range {v['min']:.1f} to {v['max']:.1f}, draws {v['values']}")
    print(json.dumps({"draws": list(draws), **s}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
