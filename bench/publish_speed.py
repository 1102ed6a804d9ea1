"""Publishing a night's rankings into a growing history: time and driver memory.

A history of `--history` rows (runs of `--run-rows` rows) is built in `rankings.lance`,
then one more run of `--run-rows` rows is published by the rank stage's own `publish`
(Parquet object + Lance append; a rerun of a run id deletes its rows through the run_id
index first), and the same run again as a rerun. Two history sizes show the growth law:
a publish should cost what the run writes, not what history holds. Memory is the
rise of the process's resident set during the publish (sampled from /proc).

    .venv/bin/python bench/publish_speed.py [--history 1000000 5000000 --run-rows 500000]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time

import lance
import numpy as np
import pyarrow as pa


def staged_run(path: str, n: int, seed: int):
    from ops.rank import RESULT_SCHEMA

    rng = np.random.default_rng(seed)
    t = pa.table({"query_id": [f"q{i // 50}" for i in range(n)], "rank": np.arange(n) % 50 + 1,
                  "image_id": [f"g{i}" for i in rng.integers(0, 10**8, n)],
                  "score": rng.random(n, dtype=np.float32), "description": pa.nulls(n, pa.string())},
                 schema=RESULT_SCHEMA)
    return lance.write_dataset(t, path)


def provenance(run_id: str) -> dict:
    return {"run_id": run_id, "run_date": "2026-11-24", "mode": "full", "prior_version": "p",
            "adapter_version": "a", "embedder": "gme", "config_hash": "h"}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def timed_with_peak(fn) -> tuple[float, float]:
    """Seconds of fn() and how far the resident set rose above its start (sampled every 5 ms)."""
    start, peak, done = rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    fn()
    secs = time.perf_counter() - t
    done.set()
    th.join()
    return secs, max(peak[0], rss_mib()) - start


def one_size(history: int, run_rows: int) -> dict:
    from pipelines.config import load_config
    from pipelines.lake import Lake
    from pipelines.rank import publish

    root = tempfile.mkdtemp(prefix="publish_bench_")
    lake = Lake.from_conf(load_config("conf/demo.yaml", [f"run_dir={root}"]))
    run = staged_run(f"{root}/staged.lance", run_rows, 0)
    for r in range(history // run_rows):
        publish(lake, run, provenance(f"old{r:04d}"))
    rows = lake.open("rankings").count_rows()
    out = {"history_rows": rows, "run_rows": run_rows}
    for label, run_id in (("publish", "new"), ("republish", "new")):
        secs, grew = timed_with_peak(lambda: publish(lake, run, provenance(run_id)))
        out[f"{label}_s"] = round(secs, 2)
        out[f"{label}_rss_growth_mib"] = round(grew)
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--run-rows", type=int, default=500_000)
    args = ap.parse_args()
    for h in args.history:
        print(json.dumps(one_size(h, args.run_rows)), flush=True)


if __name__ == "__main__":
    main()
