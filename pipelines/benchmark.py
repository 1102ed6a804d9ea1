"""`python -m pipelines benchmark --config conf/eval/<name>.yaml`: a benchmark end to end.

Loads the benchmark's official annotations (`eval.*`), writes them as the pipeline's
manifest and queries, runs ingest, caption, embed and index on its images, then the
rank stage in every mode of `eval.modes`, evaluates each ranking with the official
metrics, and writes the modes side by side: `<eval.out_dir>/results.md` (Markdown),
`results.json`, and a results page whose top holds the same table.
"""
from __future__ import annotations

import html
import json
import time

from omegaconf import OmegaConf

from ops.storage import write_bytes


def _with(cfg, **dotted):
    c = OmegaConf.create(OmegaConf.to_container(cfg))
    for k, v in dotted.items():
        OmegaConf.update(c, k, v)
    OmegaConf.set_readonly(c, True)
    return c


def markdown(name: str, split: str, results: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(results.values())))
    lines = [f"| {name} {split} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {mode} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |" for mode, m in results.items()]
    return "\n".join(lines) + "\n"


def html_table(md: str) -> str:
    rows = [r.strip("|").split("|") for r in md.strip().splitlines() if not r.startswith("|---")]
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in rows)
    return f"<h2>Benchmark</h2><table>{cells}</table>"


def run(cfg) -> str:
    from pipelines import evaluate, nightly, rank, report

    e = cfg.eval
    t0 = time.monotonic()
    image_root = e.image_root or f"{e.annotations.rstrip('/')}/images"
    b = evaluate.load(e.benchmark, e.annotations, e.split, image_root, dict(cfg.storage.s3))
    uris = evaluate.tables(b, e.out_dir, dict(cfg.storage.s3))
    print(f"[benchmark] {e.benchmark} {e.split}: {len(b.queries)} queries, {len(b.gallery)} gallery images")
    cfg = _with(cfg, **{"catalogue.manifest": uris["manifest"], "catalogue.queries": uris["queries"]})
    lines = [nightly.run_stage(cfg, s, "", []) for s in ("ingest", "caption", "embed", "index")]
    for line in lines:
        print(line, flush=True)
    results, stamp = {}, rank.new_run_id()
    for mode in e.modes:
        run_id = f"{e.benchmark}-{mode}-{stamp}"
        summary = rank.run(_with(cfg, **{"rank.mode": mode}), run_id)
        lines.append(summary.line())
        print(lines[-1], flush=True)
        results[mode] = evaluate.evaluate(b, evaluate.read_rankings(summary.parquet, dict(cfg.storage.s3)))
    md = markdown(e.benchmark, e.split, results)
    write_bytes(f"{e.out_dir}/results.md", md.encode(), dict(cfg.storage.s3))
    write_bytes(f"{e.out_dir}/results.json", json.dumps(results, indent=1).encode(), dict(cfg.storage.s3))
    page = report.write(cfg, f"{e.benchmark}-{e.modes[0]}-{stamp}", lines, evaluate_queries(b, cfg),
                        extra_html=html_table(md))
    print(md)
    return f"[benchmark] {e.benchmark} {e.split}: table at {e.out_dir}/results.md, page at {page} in {time.monotonic() - t0:.1f}s"


def evaluate_queries(b, cfg):
    import pyarrow as pa

    rows = sorted(b.queries, key=lambda q: q["query_id"])[: cfg.report.num_queries]
    return pa.Table.from_pylist(rows)
