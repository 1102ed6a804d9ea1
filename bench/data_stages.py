"""Throughput and memory of the data stages (ingest, caption, embed) on CPU, tiny models.

Prints, as JSON lines and a closing table:
- images/s of the caption and embed ops in a plain loop (one thread, no Ray);
- images/s of each stage run by Ray Data over a synthetic catalogue of each size, and
  the Ray overhead as a ratio: stage throughput / plain-loop throughput (1 = no
  overhead); the stage figure includes actor start-up and the Lance commit;
- peak RSS of the whole run (driver, raylet, GCS, workers: the process tree, sampled).

    .venv/bin/python bench/data_stages.py --sizes 1000 10000
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

import psutil

CONFIGS = ["conf/demo.yaml", "conf/bench/data.yaml"]


def plain_loop(n: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ops.caption import CaptionOp
    from ops.embed import EmbedOp
    from ops.ingest import IngestOp
    from pipelines.config import load_config, plain
    from pipelines.synthetic import build_demo_models, make_catalogue

    torch.set_num_threads(1)  # as a Ray actor with num_cpus=1 runs
    cfg = load_config(CONFIGS, ["run_dir=runs/bench/loop", f"synthetic.num_images={n}"])
    build_demo_models(cfg)
    uris = make_catalogue(cfg.synthetic.out_dir, n, cfg.synthetic.image_size, 0, 1, cfg.seed)
    conf = plain(cfg)
    images = IngestOp(conf, None)(pq.read_table(uris["manifest"]))
    images = images.append_column("pair_text", images.column("source_caption")).append_column(
        "pair_caption_kind", pa.array(["short"] * n))
    out = {}
    for name, op, bs in (("caption", CaptionOp(conf, None), cfg.caption.batch_size),
                         ("embed", EmbedOp(conf, None), cfg.embed.batch_size)):
        t = time.perf_counter()
        for i in range(0, n, bs):
            op(images.slice(i, bs))
        out[name] = n / (time.perf_counter() - t)
    return out


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def staged_run(n: int) -> dict:
    run_dir = f"runs/bench/n{n}"
    overrides = [f"run_dir={run_dir}", f"synthetic.num_images={n}"]
    cmd = [sys.executable, "-m", "pipelines", "synth", *sum((["--config", c] for c in CONFIGS), []), *overrides]
    subprocess.run(cmd, check=True, capture_output=True)
    cmd[3] = "nightly"
    cmd.append("nightly.stages=[ingest,caption,embed]")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ps, peak, lines = psutil.Process(proc.pid), [0], []

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    t = time.perf_counter()
    for line in proc.stdout:
        lines.append(line)
    proc.wait()
    if proc.returncode:
        sys.stdout.write("".join(lines[-40:]))
        raise SystemExit(f"run on {n} images failed")
    result = {"images": n, "wall_s": round(time.perf_counter() - t, 1), "peak_rss_mib": round(peak[0] / 2**20)}
    for line in lines:
        m = re.match(r"\[(ingest|caption|embed)\] read (\d+), written (\d+).* in ([\d.]+)s", line)
        if m:
            result[f"{m[1]}_images_per_s"] = round(int(m[3]) / float(m[4]), 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--loop-images", type=int, default=512)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loop = plain_loop(args.loop_images)
    print(json.dumps({"plain_loop_images_per_s": {k: round(v, 1) for k, v in loop.items()}}), flush=True)
    runs = []
    for n in args.sizes:
        r = staged_run(n)
        for stage in ("caption", "embed"):
            r[f"{stage}_ray_ratio"] = round(r[f"{stage}_images_per_s"] / loop[stage], 2)
        runs.append(r)
        print(json.dumps(r), flush=True)
    print("\n| images | peak RSS (MiB) | ingest img/s | caption img/s (ratio) | embed img/s (ratio) |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['images']} | {r['peak_rss_mib']} | {r['ingest_images_per_s']} | "
              f"{r['caption_images_per_s']} ({r['caption_ray_ratio']}) | {r['embed_images_per_s']} ({r['embed_ray_ratio']}) |")


if __name__ == "__main__":
    main()
