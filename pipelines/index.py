"""Stage `index`: the LanceDB vector index (cosine) over the gallery vectors of `embeddings`.

Built when missing; refreshed (`optimize`, which folds rows upserted since into the
index) when present. Below `index.min_rows` gallery vectors nothing is built: an exact
scan is faster there, and IVF/PQ training needs rows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import lancedb

from pipelines.lake import Lake
from pipelines.rank import GALLERY, _has_vector_index


@dataclass
class IndexSummary:
    action: str = "none"
    rows: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        return f"[index] gallery {self.rows} vectors: {self.action} in {time.monotonic() - self.started:.1f}s"


def run(cfg) -> IndexSummary:
    lake = Lake.from_conf(cfg)
    summary = IndexSummary()
    ds = lake.open("embeddings")
    summary.rows = 0 if ds is None else ds.count_rows(filter=GALLERY)
    ix = cfg.index
    if summary.rows < ix.min_rows:
        summary.action = f"no index (fewer than index.min_rows={ix.min_rows}; rank searches exactly)"
        return summary
    table = lancedb.connect(lake.root, storage_options=lake.storage_options).open_table("embeddings")
    if _has_vector_index(ds):
        table.optimize()
        summary.action = "index refreshed (new rows folded in)"
        return summary
    dim = cfg.models.embedder.dim
    partitions = ix.num_partitions or max(1, int(math.sqrt(summary.rows)))
    kwargs = dict(metric="cosine", vector_column_name="vector", index_type=ix.kind, num_partitions=partitions,
                  replace=True)
    if ix.kind == "IVF_PQ":
        sub = ix.num_sub_vectors or max(1, dim // 16)
        if dim % sub:
            raise ValueError(f"index.num_sub_vectors={sub} must divide the vector size {dim}")
        kwargs["num_sub_vectors"] = sub
    table.create_index(**kwargs)
    summary.action = f"{ix.kind} index built ({partitions} partitions)"
    return summary
