"""Stage `report`: one static HTML page per run, with its thumbnails.

A page a catalogue team can send around: a header saying what ran on what (run, date,
mode, models and checkpoints, config digest), a legend (what the scores and modes
are), the benchmark's table with its chance level when there is one, then one row per
query in natural order (q2 before q10) with a search box: the reference image, the
modification, and for each mode that ran (the benchmark runs several: side by side)
the generated description and the top `report.top_k` images with their scores, the
known target (the queries table's target_id) outlined. Last, the run's stage lines.
Written to <report.dir>/<run_id>/index.html; <report.dir>/index.html points at the newest.
"""
from __future__ import annotations

import hashlib
import html
import io
import os
import re
import time
from urllib.parse import quote

import pyarrow as pa

from ops.images import ImageRejected, load_image
from ops.storage import is_s3, write_bytes
from pipelines.common import read_queries
from pipelines.context import RunContext, Summary
from pipelines.lake import TableError, lookup, sql_in

STYLE = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse}
td,th{vertical-align:top;padding:6px;border-bottom:1px solid #ddd;text-align:left}td.top{white-space:nowrap}
figure{display:inline-block;margin:0 4px;text-align:center}
figure img{display:block;border:3px solid transparent}figure.target img{border-color:#1a9850}
figcaption{font-size:11px}.desc{max-width:260px;font-size:12px;color:#555}
pre{background:#f6f6f6;padding:8px}dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}
dt{font-weight:bold}dd{margin:0;font-family:monospace}.legend{max-width:900px;color:#444}
#search{font-size:14px;padding:4px;width:320px;margin:8px 0}.chance td{color:#888;font-style:italic}"""

SEARCH_JS = """<script>
function filterRows(text){text=text.toLowerCase();for(const tr of document.querySelectorAll('tr.query')){
tr.style.display=tr.dataset.search.includes(text)?'':'none';}
const shown=document.querySelectorAll('tr.query:not([style*="none"])');
document.getElementById('shown').textContent=shown.length;}
</script>"""

MODES = {
    "full": "Fusion-Diff: a target embedding sampled from the prior + Control-Adapter, given the "
            "generated description and the query's own embedding",
    "query_only": "the query's own fused embedding f_M(reference image, modification), no diffusion",
    "prior_only": "sampled from the Stage 1 prior given the generated description alone",
    "joint": "MVFT-JI's joint score: w cos(query, image) + (1 - w) cos(description, image)",
    "text": "a text-only query (TIGeR): the prior sampled from the text, or the text's own embedding",
}


def natural_key(text: str) -> list:
    """q2 before q10: digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def _thumb(uri: str, s3: dict, size: int, background: str) -> bytes | None:
    try:
        im = load_image(uri, s3, background)
    except ImageRejected:
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _figure(src: str | None, caption: str, target: bool, text: str | None = None) -> str:
    """An image with its label and (text) the captioner's caption of it."""
    img = (f'<img src="{html.escape(quote(src))}" alt="{html.escape(caption)}">' if src
           else "<div>(missing)</div>")
    css = "target" if target else ""
    said = f"<br><i>{html.escape(text)}</i>" if text else ""
    return f'<figure class="{css}">{img}<figcaption>{html.escape(caption)}{said}</figcaption></figure>'


def thumb_name(image_id: str) -> str:
    """A thumbnail's file name: the id's safe characters (readable in a listing) and a
    digest of the whole id (so that ids differing in other characters never collide, and
    no id can name a path outside the page's folder)."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", str(image_id))[:64].lstrip(".")
    return f"{readable}-{hashlib.sha256(str(image_id).encode()).hexdigest()[:12]}.jpg"


def newest_run(ctx: RunContext) -> str:
    """The run the page shows: the command's own when it ranked (nightly), the one
    `rank.run_id` names, or else (`report` run alone) the newest run in `rankings`."""
    rankings = ctx.lake.open("rankings")
    if rankings is None:
        raise TableError(f"no rankings table at {ctx.lake.uri('rankings')}: run rank first")
    ranked_here = any(line.startswith("[rank]") for line in ctx.lines)
    if ranked_here or ctx.cfg.rank.run_id or rankings.count_rows(filter=f"run_id = '{ctx.run_id}'"):
        return ctx.run_id
    # Runs are appended whole (a rerun's old rows deleted first), so the last row is the
    # newest published run's.
    last = rankings.count_rows() - 1
    if last < 0:
        raise TableError(f"the rankings table {ctx.lake.uri('rankings')} is empty: run rank first")
    return rankings.to_table(columns=["run_id"], offset=last, limit=1).column("run_id")[0].as_py()


def run(ctx: RunContext) -> Summary:
    """The page of the context's run (see `newest_run`), for the first `report.num_queries` queries."""
    if not ctx.page_runs:
        ctx = ctx.with_settings(run_id=newest_run(ctx))
    ctx.start_ray()
    queries = read_queries(ctx).take_all()
    sample = pa.Table.from_pylist(
        sorted(queries, key=lambda q: natural_key(q["query_id"]))[: ctx.cfg.report.num_queries]
    )
    if ctx.dry_run:
        return Summary("report", read=sample.num_rows, note="dry run: no page written")
    page = write(ctx, sample, ctx.page_runs or None)
    return Summary("report", read=sample.num_rows, written=1, note=f"page at {page}")


def _header(rankings, run_ids: dict[str, str]) -> str:
    """What ran on what: one line of provenance per mode's run."""
    cols = ["run_id", "run_date", "mode", "embedder", "prior_version", "adapter_version", "config_hash"]
    rows = []
    for mode, run_id in run_ids.items():
        meta = rankings.to_table(columns=cols, filter=f"run_id = '{run_id}'", limit=1).to_pylist()
        if meta:
            m = meta[0]
            rows.append("".join(f"<td>{html.escape(str(m[c] or '-'))}</td>" for c in cols))
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    return f"<table class=runs><tr>{head}</tr>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>"


def write(ctx: RunContext, queries_table: pa.Table, run_ids: dict[str, str] | None = None) -> str:
    """The page for the queries of `queries_table`, showing each mode's run of `run_ids`
    (mode -> run id; default: the context's run alone); returns its path (or URI)."""
    lake, r = ctx.lake, ctx.cfg.report
    rankings = lake.open("rankings")
    if rankings is None:
        raise TableError(f"no rankings table at {lake.uri('rankings')}: run rank first")
    if run_ids is None:
        found = rankings.to_table(columns=["mode"], filter=f"run_id = '{ctx.run_id}'", limit=1).to_pylist()
        run_ids = {found[0]["mode"] if found else ctx.cfg.rank.mode: ctx.run_id}
    out = f"{r.dir.rstrip('/')}/{ctx.run_id}"
    qids = sorted(queries_table.column("query_id").to_pylist(), key=natural_key)[: r.num_queries]
    queries = {row["query_id"]: row for row in queries_table.to_pylist() if row["query_id"] in set(qids)}
    ranked: dict[tuple[str, str], list[dict]] = {}
    for mode, run_id in run_ids.items():
        if not qids:
            break
        rows = rankings.to_table(
            columns=["query_id", "rank", "image_id", "score", "description"],
            filter=f"run_id = '{run_id}' AND rank <= {r.top_k} AND " + sql_in("query_id", qids),
        )
        for row in rows.sort_by([("query_id", "ascending"), ("rank", "ascending")]).to_pylist():
            ranked.setdefault((mode, row["query_id"]), []).append(row)
    image_ids = {x["image_id"] for v in ranked.values() for x in v}
    image_ids |= {q.get("reference_id") for q in queries.values() if q.get("reference_id")}
    uris = {k: v["uri"] for k, v in lookup(lake.open("images"), sorted(image_ids), ["uri"]).items()}
    captions = lookup(lake.open("captions"), sorted(image_ids), ["caption_short"])
    said = {k: v["caption_short"] for k, v in captions.items()}
    thumbs = {}
    for image_id in sorted(image_ids):
        data = (_thumb(uris[image_id], lake.s3, r.thumbnail_size, ctx.cfg.images.alpha_background)
                if image_id in uris else None)
        if data is not None:
            write_bytes(f"{out}/thumbs/{thumb_name(image_id)}", data, lake.s3)
            thumbs[image_id] = f"thumbs/{thumb_name(image_id)}"
    body = []
    for qid in qids:
        q, ref = queries[qid], queries[qid].get("reference_id")
        cells = []
        for mode in run_ids:
            top = ranked.get((mode, qid), [])
            desc = top[0]["description"] if top and top[0]["description"] and mode != "text" else ""
            figs = "".join(
                _figure(
                    thumbs.get(x["image_id"]),
                    f"#{x['rank']} {x['image_id']} {x['score']:.3f}",
                    x["image_id"] == q.get("target_id"),
                    said.get(x["image_id"]),
                )
                for x in top
            )
            cells.append(
                f"<td class=top><div class=desc>{html.escape(desc)}</div>"
                f"{figs or '(not ranked: see the rejects table)'}</td>"
            )
        search = " ".join(
            str(v) for v in (qid, q.get("modification_text"), ref, q.get("target_id")) if v
        ).lower()
        body.append(
            f'<tr class=query data-search="{html.escape(search)}"><td>{html.escape(qid)}</td>'
            f"<td>{_figure(thumbs.get(ref), ref or '(text query)', False, said.get(ref))}</td>"
            f"<td><b>{html.escape(q['modification_text'] or '')}</b></td>{''.join(cells)}</tr>"
        )
    mode_heads = "".join(f"<th>{html.escape(m)}: top {r.top_k}</th>" for m in run_ids)
    legend = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(MODES.get(m, ''))}</li>" for m in run_ids)
    title = ", ".join(f"{m} ({i})" for m, i in run_ids.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rankings {html.escape(title)}</title>
<style>{STYLE}</style>{SEARCH_JS}</head><body>
<h1>Composed image retrieval: {html.escape(ctx.run_id)}</h1>
{_header(rankings, run_ids)}
<div class=legend><p>Each query is a reference image and a modification ("this image, but ..."). Under each
mode: the description of the target the describer wrote (where the mode writes one) and the
top {r.top_k} catalogue images, best first, each with the captioner's short caption of it
(in italics). Scores are cosine similarities between the query's vector and the image's
vector (1 is identical, 0 unrelated); a known target is outlined in green.</p><ul>{legend}</ul></div>
{ctx.page_header}
<p><input id=search placeholder="search query id, text or image id" oninput="filterRows(this.value)">
<span id=shown>{len(qids)}</span> of {len(qids)} queries shown
(the first {r.num_queries} in natural order).</p>
<table><tr><th>query</th><th>reference</th><th>modification</th>{mode_heads}</tr>
{"".join(body)}</table>
<h2>Stages</h2><pre>{html.escape(chr(10).join(ctx.lines))}</pre>
<p>Written {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}.</p></body></html>"""
    write_bytes(f"{out}/index.html", page.encode(), lake.s3)
    run_id = html.escape(ctx.run_id)
    write_bytes(
        f"{r.dir.rstrip('/')}/index.html",
        f'<!doctype html><meta http-equiv="refresh" content="0; url={run_id}/index.html">'
        f'<a href="{run_id}/index.html">run {run_id}</a>'.encode(),
        lake.s3,
    )
    return f"{out}/index.html" if is_s3(out) else os.path.abspath(f"{out}/index.html")
