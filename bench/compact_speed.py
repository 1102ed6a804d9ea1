"""Keyed lookups after a year of nightly commits, before and after the `compact` stage.

Each simulated night upserts `--rows` new keys (and re-writes 1% of the old ones, as
changed images do) into a `captions` table through the stages' own commit
(pipelines/lake.py _upsert: merge_insert + BTree index), then times a keyed lookup of
`--keys` random keys (the incremental stages' per-batch query) before and after
`compact`. Two sizes show the growth law: before compaction the lookup grows with the
number of nights (fragments), after it stays flat.

    .venv/bin/python bench/compact_speed.py [--nights 365 100 --rows 1000 --keys 10000]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa


def lookup_seconds(lake, keys: list[str], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        lake.lookup("captions", keys, ["caption"])
        times.append(time.perf_counter() - t)
    return min(times)


def one_size(nights: int, rows: int, n_keys: int) -> dict:
    from pipelines.config import load_config
    from pipelines.context import RunContext
    from pipelines.lake import Lake, _upsert
    from pipelines.registry import STAGES

    root = tempfile.mkdtemp(prefix="compact_bench_")
    cfg = load_config("conf/demo.yaml", [f"run_dir={root}", "compact.keep_versions_days=0"])
    lake = Lake.from_conf(cfg)
    schema = pa.schema([("image_id", pa.string()), ("caption", pa.string())])
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for night in range(nights):
        ids = [f"i{night:04d}_{i:05d}" for i in range(rows)]
        if night:
            old = rng.integers(0, night * rows, rows // 100)
            ids += [f"i{o // rows:04d}_{o % rows:05d}" for o in old]
        table = pa.table({"image_id": ids, "caption": [f"night {night}"] * len(ids)}, schema=schema)
        _upsert(lake, "captions", ["image_id"], schema, table.to_reader())
    commit_s = time.perf_counter() - t
    total = nights * rows
    keys = [f"i{k // rows:04d}_{k % rows:05d}" for k in rng.integers(0, total, n_keys)]
    fragments = len(lake.open("captions").get_fragments())
    before = lookup_seconds(lake, keys)
    t = time.perf_counter()
    summary = STAGES["compact"].run(RunContext.create(cfg))
    compact_s = time.perf_counter() - t
    after = lookup_seconds(lake, keys)
    shutil.rmtree(root, ignore_errors=True)
    return {"nights": nights, "rows_per_night": rows, "table_rows": total, "commits_s": round(commit_s, 1),
            "fragments_before": fragments, "fragments_after": summary.fragments_after,
            "versions_removed": summary.versions_removed, "lookup_s_before": round(before, 3),
            "lookup_s_after": round(after, 3), "keys": n_keys, "compact_s": round(compact_s, 1),
            "slowdown_before_compact": round(before / after, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nights", type=int, nargs="+", default=[365, 100])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--keys", type=int, default=10_000)
    args = ap.parse_args()
    for n in args.nights:
        print(json.dumps(one_size(n, args.rows, args.keys)), flush=True)


if __name__ == "__main__":
    main()
