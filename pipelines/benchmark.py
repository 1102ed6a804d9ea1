"""`python -m pipelines benchmark --config conf/eval/<name>.yaml`: a benchmark end to end.

Loads the benchmark's official annotations (`eval.*`), writes them as the pipeline's
manifest and queries, runs ingest and caption on its images, then embed, index and the
rank stage in every mode of `eval.modes` (and first, the gallery embedded with
finetune_embedder.base, each mode of `eval.base_embedder_modes`: the embedder before
fine-tuning; `embeddings` is then restored to its version before them), evaluates
each ranking with the official metrics, and writes the modes side by side:
`<eval.out_dir>/results.md` (Markdown), `results.json`, and a results page whose top
holds the same table.
"""
from __future__ import annotations

import html
import json
import time

from ops.storage import write_bytes
from pipelines.context import RunContext, new_run_id
from pipelines.registry import STAGES


# The row of a random ranking (pipelines/evaluate.py chance): what a method must beat.
CHANCE = "chance (random ranking)"


def markdown(name: str, split: str, results: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(results.values())))
    lines = [f"| {name} {split} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {mode} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |" for mode, m in results.items()]
    return "\n".join(lines) + "\n"


def html_table(md: str, note: str = "") -> str:
    rows = [r.strip("|").split("|") for r in md.strip().splitlines() if not r.startswith("|---")]
    def row(r: list[str]) -> str:
        css = ' class="chance"' if r[0].strip() == CHANCE else ""
        return f"<tr{css}>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"

    return f"<h2>Benchmark</h2><table>{''.join(map(row, rows))}</table><p>{html.escape(note)}</p>"


def run(ctx: RunContext) -> str:
    """The benchmark of `eval.*` through the stages and every mode of eval.modes; the table's path."""
    from pipelines import evaluate

    cfg, e = ctx.cfg, ctx.cfg.eval
    t0 = time.monotonic()
    b = evaluate.load(e.benchmark, e.annotations, e.split, e.image_root, dict(cfg.storage.s3),
                      e.fashioniq_captions)
    uris = evaluate.tables(b, e.out_dir, dict(cfg.storage.s3))
    print(f"[benchmark] {e.benchmark} {e.split}: {len(b.queries)} queries, {len(b.gallery)} gallery images")
    stamp = new_run_id()
    ctx = ctx.with_settings(run_id=f"{e.benchmark}-{e.modes[0]}-{stamp}", **{
        "catalogue.manifest": uris["manifest"], "catalogue.queries": uris["queries"],
        # The benchmark's gallery joins the lake beside the catalogue: it deletes nothing.
        "ingest.delete_missing": False})
    ctx.lines.clear()

    def ranked(c: RunContext, mode: str, label: str, tag: str) -> dict[str, float]:
        c.page_runs[label] = f"{e.benchmark}-{mode}{tag}-{stamp}"
        summary = STAGES["rank"].run(c.with_settings(run_id=c.page_runs[label], **{"rank.mode": mode}))
        c.lines.append(summary.line())
        print(c.lines[-1], flush=True)
        return evaluate.evaluate(b, evaluate.read_rankings(summary.outputs["parquet"], dict(cfg.storage.s3)))

    def stages(c: RunContext, names) -> None:
        for stage in names:
            c.lines.append(STAGES[stage].run(c).line())
            print(c.lines[-1], flush=True)

    def embedded_and_ranked(c: RunContext, modes, suffix: str, tag: str) -> None:
        stages(c, ("embed", "index"))
        for mode in modes:
            results[mode + suffix] = ranked(c, mode, mode + suffix, tag)

    results = {}
    # Once: neither reads the embedder.
    stages(ctx, ("ingest", "caption"))
    if e.base_embedder_modes:
        # The gallery embedded with the embedder before fine-tuning in versions of
        # `embeddings` that are then set aside: the table is again what it was (the
        # nightly's vectors and index), and the modes below embed only what it lacks.
        base = ctx.with_settings(**{"models.embedder.name_or_path": cfg.finetune_embedder.base})
        before = ctx.lake.open("embeddings")
        embedded_and_ranked(base, e.base_embedder_modes, " (before fine-tuning)", "-before-finetune")
        if before is not None:
            ctx.lake.restore("embeddings", before.version)
    embedded_and_ranked(ctx, e.modes, "", "")
    results[CHANCE] = evaluate.chance(b, cfg.seed)
    md = markdown(e.benchmark, e.split, results)
    write_bytes(f"{e.out_dir}/results.md", md.encode(), dict(cfg.storage.s3))
    write_bytes(f"{e.out_dir}/results.json", json.dumps(results, indent=1).encode(), dict(cfg.storage.s3))
    ctx.page_header = html_table(md, f"{CHANCE}: the same metrics of a random ranking of the gallery")
    page = STAGES["report"].run(ctx).note
    print(md)
    return (
        f"[benchmark] {e.benchmark} {e.split}: table at {e.out_dir}/results.md, {page} "
        f"in {time.monotonic() - t0:.1f}s"
    )
