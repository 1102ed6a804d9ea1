"""Stage `report`: one static HTML page per run, with its thumbnails.

For a sample of queries (the first `report.num_queries` by query_id): the reference
image, the modification text, the generated description and the top `report.top_k`
images with their scores, the known target (the queries table's target_id) outlined
where there is one; and the run's stage lines and timings. Written to
<report.dir>/<run_id>/index.html, and <report.dir>/index.html points at the newest run.
"""
from __future__ import annotations

import html
import io
import os
import time


import pyarrow as pa

from ops.images import ImageRejected, load_image
from ops.storage import is_s3, write_bytes
from pipelines.common import read_queries
from pipelines.context import RunContext, Summary
from pipelines.lake import TableError, lookup, sql_in

STYLE = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse}
td{vertical-align:top;padding:6px;border-bottom:1px solid #ddd}td.top{white-space:nowrap}
figure{display:inline-block;margin:0 6px;text-align:center}
figure img{display:block;border:3px solid transparent}figure.target img{border-color:#1a9850}
figcaption{font-size:11px}.desc{max-width:260px;font-size:12px;color:#555}
pre{background:#f6f6f6;padding:8px}"""


def _thumb(uri: str, s3: dict, size: int) -> bytes | None:
    try:
        im = load_image(uri, s3)
    except ImageRejected:
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _figure(src: str | None, caption: str, target: bool) -> str:
    img = f'<img src="{html.escape(src)}" alt="{html.escape(caption)}">' if src else "<div>(missing)</div>"
    css = "target" if target else ""
    return f'<figure class="{css}">{img}<figcaption>{html.escape(caption)}</figcaption></figure>'


def run(ctx: RunContext) -> Summary:
    """The page of the context's run, for the first `report.num_queries` queries."""
    ctx.start_ray()
    sample = pa.Table.from_pylist(read_queries(ctx).sort("query_id").take(ctx.cfg.report.num_queries))
    page = write(ctx, sample)
    return Summary("report", read=sample.num_rows, written=1, note=f"page at {page}")


def write(ctx: RunContext, queries_table: pa.Table) -> str:
    """The page of run `ctx.run_id` for the queries of `queries_table`; returns its path (or URI)."""
    lake, r, run_id = ctx.lake, ctx.cfg.report, ctx.run_id
    stage_lines, extra_html = ctx.lines, ctx.page_header
    out = f"{r.dir.rstrip('/')}/{run_id}"
    rankings = lake.open("rankings")
    if rankings is None:
        raise TableError(f"no rankings table at {lake.uri('rankings')}: run rank first")
    qids = sorted(queries_table.column("query_id").to_pylist())[: r.num_queries]
    queries = {row["query_id"]: row for row in queries_table.to_pylist() if row["query_id"] in set(qids)}
    rows = (
        rankings.to_table(filter=f"run_id = '{run_id}' AND rank <= {r.top_k} AND " + sql_in("query_id", qids))
        if qids
        else None
    )
    by_query: dict[str, list[dict]] = {}
    for row in (
        rows.sort_by([("query_id", "ascending"), ("rank", "ascending")]).to_pylist()
        if rows is not None
        else []
    ):
        by_query.setdefault(row["query_id"], []).append(row)
    image_ids = {x["image_id"] for v in by_query.values() for x in v}
    image_ids |= {q.get("reference_id") for q in queries.values() if q.get("reference_id")}
    uris = {k: v["uri"] for k, v in lookup(lake.open("images"), sorted(image_ids), ["uri"]).items()}
    thumbs = {}
    for image_id in sorted(image_ids):
        data = _thumb(uris[image_id], lake.s3, r.thumbnail_size) if image_id in uris else None
        if data is not None:
            write_bytes(f"{out}/thumbs/{image_id}.jpg", data, lake.s3)
            thumbs[image_id] = f"thumbs/{image_id}.jpg"
    body = []
    for qid in qids:
        q, ranked = queries[qid], by_query.get(qid, [])
        ref = q.get("reference_id")
        desc = ranked[0]["description"] if ranked and ranked[0]["description"] else ""
        cells = "".join(
            _figure(
                thumbs.get(x["image_id"]),
                f"#{x['rank']} {x['image_id']} {x['score']:.3f}",
                x["image_id"] == q.get("target_id"),
            )
            for x in ranked
        )
        body.append(
            f"<tr><td>{html.escape(qid)}</td>"
            f"<td>{_figure(thumbs.get(ref), ref or '(text query)', False)}</td>"
            f"<td><b>{html.escape(q['modification_text'] or '')}</b>"
            f"<div class=desc>{html.escape(desc)}</div></td>"
            f"<td class=top>{cells or '(not ranked: see rejects)'}</td></tr>"
        )
    meta = rankings.to_table(
        columns=["mode", "prior_version", "adapter_version", "config_hash"],
        filter=f"run_id = '{run_id}'",
        limit=1,
    ).to_pylist()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rankings {html.escape(run_id)}</title>
<style>{STYLE}</style></head><body>
<h1>Run {html.escape(run_id)}</h1>
<p>{html.escape(str(meta[0]) if meta else "")}</p>
{extra_html}
<p>Known targets are outlined in green. Scores are cosine similarities.</p>
<table><tr><th>query</th><th>reference</th><th>modification / generated description</th>
<th>top {r.top_k}</th></tr>
{"".join(body)}</table>
<h2>Stages</h2><pre>{html.escape(chr(10).join(stage_lines))}</pre>
<p>Written {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}.</p></body></html>"""
    write_bytes(f"{out}/index.html", page.encode(), lake.s3)
    write_bytes(
        f"{r.dir.rstrip('/')}/index.html",
        f'<!doctype html><meta http-equiv="refresh" content="0; url={run_id}/index.html">'
        f'<a href="{run_id}/index.html">run {html.escape(run_id)}</a>'.encode(),
        lake.s3,
    )
    return f"{out}/index.html" if is_s3(out) else os.path.abspath(f"{out}/index.html")
