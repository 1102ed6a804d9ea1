"""How much of each rank mode's recall is the describer's: a finished demo's benchmark
queries split by whether the describer's target description T~ is the target's own
(every attribute right), each mode's R@1 and R@10 on both parts.

    .venv/bin/python bench/describer_split.py RUN_DIR

RUN_DIR is a finished `make demo` run (runs/demo): its catalogue (the items'
attributes in manifest.parquet, the CIRR-layout annotations) and the benchmark's
rankings (lake/rankings/, the newest `cirr-<mode>-<stamp>` run of each mode). A world
item is its five attributes, so a description that names all five picks the target out
of the gallery; the paper's Stage-I-only falls short because real images hold what
text does not say ("fails to preserve the reference image's core visual identity").
`prior_only` and `full` read T~; `query_only` reads the edit text and the reference.
Prints a line per mode and a JSON record.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys

import pyarrow.parquet as pq

from pipelines.synthetic import Item

MODES = ("full", "query_only", "prior_only", "joint")


def newest_runs(rankings: str) -> dict[str, str]:
    """mode -> the Parquet file of its newest benchmark run."""
    out: dict[str, tuple[str, str]] = {}
    for path in glob.glob(os.path.join(rankings, "run_date=*", "cirr-*.parquet")):
        m = re.fullmatch(r"cirr-(.+)-(\d{8}T\d{6}Z)\.parquet", os.path.basename(path))
        if m and m.group(1) in MODES and (m.group(1) not in out or m.group(2) > out[m.group(1)][0]):
            out[m.group(1)] = (m.group(2), path)
    return {mode: path for mode, (_, path) in out.items()}


def main(run_dir: str) -> dict:
    items = {r["image_id"]: Item(r["shape"], r["colour"], r["size"], r["position"], r["background"])
             for r in pq.read_table(os.path.join(run_dir, "catalogue", "manifest.parquet")).to_pylist()}
    with open(os.path.join(run_dir, "catalogue", "cirr", "captions", "cap.rc2.val.json")) as f:
        target = {str(q["pairid"]): q["target_hard"] for q in json.load(f)}
    runs = newest_runs(os.path.join(run_dir, "lake", "rankings"))
    if "prior_only" not in runs:
        raise SystemExit(f"no benchmark run of prior_only under {run_dir}/lake/rankings: run `make demo` first")
    ranked = {}
    for mode, path in runs.items():
        rows = pq.read_table(path, columns=["query_id", "rank", "image_id", "description"]).to_pylist()
        ranked[mode] = {}
        for r in rows:
            ranked[mode].setdefault(r["query_id"], {})[r["image_id"]] = (r["rank"], r["description"])
    described = {q: next(iter(hits.values()))[1] for q, hits in ranked["prior_only"].items()}
    exact = {q for q, d in described.items() if d == items[target[q]].description()}
    parts = {"T~ exact": exact, "T~ wrong": set(target) - exact}
    out = {"queries": len(target), "described_exactly": len(exact), "modes": {}}
    print(f"describer: {len(exact)} of {len(target)} target descriptions exact "
          f"({100 * len(exact) / len(target):.1f}%)")
    for mode in [m for m in MODES if m in ranked]:
        out["modes"][mode] = {}
        line = []
        for name, queries in parts.items():
            ranks = [ranked[mode].get(q, {}).get(target[q], (10**9, None))[0] for q in queries]
            r1 = 100 * sum(r <= 1 for r in ranks) / max(len(ranks), 1)
            r10 = 100 * sum(r <= 10 for r in ranks) / max(len(ranks), 1)
            out["modes"][mode][name] = {"queries": len(ranks), "R@1": round(r1, 2), "R@10": round(r10, 2)}
            line.append(f"{name} ({len(ranks)}): R@1 {r1:.1f} R@10 {r10:.1f}")
        print(f"{mode}: " + "; ".join(line))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
