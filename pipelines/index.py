"""Stage `index`: the LanceDB vector index (cosine) over the gallery vectors of `embeddings`.

Built when missing; refreshed (`optimize`, which folds rows upserted since into the
index) when present. Below `index.min_rows` gallery vectors nothing is built: an exact
scan is faster there, and IVF/PQ training needs rows.
"""
from __future__ import annotations

import math

import lancedb

from ops.schemas import GALLERY
from pipelines.context import RunContext, Summary
from pipelines.lake import has_vector_index


def run(ctx: RunContext) -> Summary:
    lake, ix = ctx.lake, ctx.cfg.index
    ds = lake.open("embeddings")
    summary = Summary("index", read=0 if ds is None else ds.count_rows(filter=GALLERY))
    if summary.read < ix.min_rows:
        summary.note = (
            f"no index (fewer than index.min_rows={ix.min_rows} gallery vectors; rank searches exactly)"
        )
        return summary
    if ctx.dry_run:
        summary.note = "dry run: the index would be " + ("refreshed" if has_vector_index(ds) else "built")
        return summary
    table = lancedb.connect(lake.root, storage_options=lake.storage_options).open_table("embeddings")
    summary.written = summary.read
    if has_vector_index(ds):
        table.optimize()
        summary.note = "index refreshed (new rows folded in)"
        return summary
    dim = ctx.cfg.models.embedder.dim
    partitions = ix.num_partitions or max(1, int(math.sqrt(summary.read)))
    kwargs = dict(
        metric="cosine",
        vector_column_name="vector",
        index_type=ix.kind,
        num_partitions=partitions,
        replace=True,
    )
    if ix.kind == "IVF_PQ":
        # The config's rules checked that a set num_sub_vectors divides the dimension.
        kwargs["num_sub_vectors"] = ix.num_sub_vectors or max(1, dim // 16)
    table.create_index(**kwargs)
    summary.note = f"{ix.kind} index built ({partitions} partitions)"
    return summary
