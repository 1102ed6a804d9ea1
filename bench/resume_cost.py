"""What a crash costs: each data stage killed (SIGKILL of its whole process group and
its Ray processes) once it has staged a share of the catalogue, then rerun, at two
catalogue sizes. The rerun commits what the killed run staged (`resumed`) and
processes only the rest; without resumable staging it would redo the whole stage.

For each size N: N small PNG files and a manifest, the real `ingest`, `caption` and
`embed` commands (`python -m pipelines <stage>`, the demo's tiny models) with
`<stage>.commit_every` rows per staging commit. The staging dataset is polled; once it
holds `--kill-at` of N rows the command is killed. The rerun's summary line gives
`resumed` (staged rows: two an image for embed, its image and pair vectors) and the
images it processed (written + rejected). Printed per stage and size: rows staged when
polled last before the kill, rows resumed, images the rerun processed, and that as a
share of the stage; a rerun whose images do not add up (processed + skipped = N) or
whose table does not hold N images' rows exactly stops the script.
The rows made but not yet committed when the kill came are invisible from outside (at
most one commit interval plus the batches in flight: tests/test_resume.py counts them
with a stage that dies at a known row).

    .venv/bin/python bench/resume_cost.py [--sizes 2000 8000 --commit-every 250 --kill-at 0.6]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import lance
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.unchanged_night import write_images  # noqa: E402

STAGES = ("ingest", "caption", "embed")
# Each stage's table and its rows per image (embed writes an image vector and a pair vector).
TABLES = {"ingest": ("images", 1), "caption": ("captions", 1), "embed": ("embeddings", 2)}
POLL_S = 0.2


def staged_rows(uri: str) -> int:
    try:
        return lance.dataset(uri).count_rows()
    except (ValueError, OSError, RuntimeError):
        return 0  # not created yet, or a commit in progress


def kill_all(proc: subprocess.Popen, ray_tmp) -> None:
    """SIGKILL the command's process group, then any Ray process of its temp dir `ray_tmp`
    (Ray's own daemons leave the group; the crash drill of tests/ uses this too)."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for p in psutil.process_iter(["cmdline"]):
        if any(str(ray_tmp) in part for part in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.Error:
                pass


def summary_of(stage: str, out: str) -> dict:
    line = next((ln for ln in out.splitlines() if ln.startswith(f"[{stage}] read ")), None)
    if line is None:
        raise SystemExit(f"{stage}: no summary line in\n{out[-3000:]}")
    num = {k: int(m.group(1)) if (m := re.search(rf"{k} (\d+)", line)) else 0
           for k in ("read", "written", "skipped as unchanged", "rejected", "resumed")}
    return num | {"skipped": num.pop("skipped as unchanged"), "line": line}


def one_size(n: int, every: int, kill_at: float, overrides: list[str]) -> list[dict]:
    root = tempfile.mkdtemp(prefix=f"resume_{n}_")
    ray_tmp = tempfile.mkdtemp(prefix="rs_", dir="/tmp")  # Ray's socket paths stay short
    uris = write_images(f"{root}/images", n)
    pq.write_table(pa.table({"image_id": [f"img{i:07d}" for i in range(n)], "uri": uris}),
                   f"{root}/manifest.parquet")
    from pipelines.config import load_config

    settings = [f"run_dir={root}", f"catalogue.manifest={root}/manifest.parquet", "ray.progress_bars=false",
                *overrides]
    storage = load_config("conf/demo.yaml", settings).storage
    cmd = [sys.executable, "-m", "pipelines", "STAGE", "--config", "conf/demo.yaml", *settings]
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_TMPDIR=ray_tmp)
    rows = []
    for stage in STAGES:
        args = [stage if a == "STAGE" else a for a in cmd] + [f"{stage}.commit_every={every}"]
        staging = f"{storage.staging}/{stage}.lance"
        t = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        seen = 0
        while proc.poll() is None and seen < kill_at * n:
            time.sleep(POLL_S)
            seen = staged_rows(staging)
        finished = proc.poll() is not None
        kill_all(proc, ray_tmp)
        killed_s = time.perf_counter() - t
        if finished:
            raise SystemExit(f"{stage} finished before {kill_at:.0%} was staged: use a larger size")
        t = time.perf_counter()
        rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=3600)
        if rerun.returncode:
            raise SystemExit(f"{stage} rerun failed:\n{rerun.stdout[-3000:]}{rerun.stderr[-3000:]}")
        s = summary_of(stage, rerun.stdout + rerun.stderr)
        processed = s["written"] + s["rejected"]
        rows.append({"images": n, "stage": stage, "commit_every": every, "staged_seen": seen,
                     "resumed": s["resumed"], "rerun_processed": processed,
                     "rerun_share": round(processed / n, 3),
                     # Images run through the model twice: the batches in flight past the last commit.
                     "redone": processed + math.ceil(s["resumed"] / TABLES[stage][1]) - n,
                     "killed_after_s": round(killed_s, 1), "rerun_s": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
        table = lance.dataset(f"{storage.root}/{TABLES[stage][0]}.lance").count_rows()
        if s["resumed"] < seen or processed + s["skipped"] != n or table != n * TABLES[stage][1]:
            raise SystemExit(f"{stage}: rows lost or duplicated: {rows[-1]}, {table} rows in the table "
                             f"({s['line']})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--commit-every", type=int, default=250)
    ap.add_argument("--kill-at", type=float, default=0.6)
    args = ap.parse_args()
    from pipelines.config import load_config
    from pipelines.synthetic import build_demo_models

    models_dir = tempfile.mkdtemp(prefix="resume_models_")
    cfg = load_config("conf/demo.yaml", [f"run_dir={models_dir}"])
    build_demo_models(cfg)
    overrides = [f"models.{role}.name_or_path={cfg.models[role].name_or_path}"
                 for role in ("captioner", "embedder", "describer", "text_encoder")]
    results = [r for n in args.sizes for r in one_size(n, args.commit_every, args.kill_at, overrides)]
    print("\n| images | stage | rows staged at the kill | rows resumed | images the rerun processed | redone |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['images']:,} | {r['stage']} | {r['staged_seen']:,} | {r['resumed']:,} | "
              f"{r['rerun_processed']:,} | {r['redone']} |")


if __name__ == "__main__":
    main()
