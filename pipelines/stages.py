"""Helpers the three data stages share: reading tables and skipping unchanged rows."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import ray

from pipelines.lake import Lake, lookup, open_dataset


def read_table(lake: Lake, table: str, columns: Sequence[str] | None = None,
               filter: str | None = None) -> ray.data.Dataset:
    return ray.data.read_lance(lake.uri(table), columns=list(columns) if columns else None, filter=filter,
                               storage_options=lake.storage_options)


def keep_changed(batch: pa.Table, table_uri: str, storage_options: dict, compare: dict[str, str],
                 constants: dict[str, str] | None = None, where: str | None = None,
                 key: str = "image_id") -> pa.Table:
    """Rows of `batch` that `table` lacks or holds with other values; rows to reject always pass.

    `compare` maps a table column to the batch column it must equal; `constants` a table
    column to the value it must have (the model that wrote it). One keyed lookup per batch,
    so nothing of the table is collected anywhere.
    """
    ids = batch.column(key).to_pylist()
    existing = lookup(open_dataset(table_uri, storage_options), [i for i in ids if i],
                      list(compare) + list(constants or {}), key=key, where=where)
    batch_cols = {c: batch.column(c).to_pylist() for c in compare.values()}
    rejects = batch.column("reject_reason").to_pylist() if "reject_reason" in batch.schema.names else [None] * len(ids)
    keep = []
    for n, row_key in enumerate(ids):
        row = existing.get(row_key)
        same = row is not None and all(row[t] == batch_cols[b][n] for t, b in compare.items()) \
            and all(row[t] == v for t, v in (constants or {}).items())
        keep.append(rejects[n] is not None or not same)
    return batch.filter(pa.array(np.array(keep, dtype=bool)))


def any_rows(ds: ray.data.Dataset) -> bool:
    """Whether the (filtered) dataset yields a row, found by streaming until the first one:
    on an unchanged catalogue a stage then starts no model actor at all (the keyed
    lookups run, the models do not), and with changes the probe stops early."""
    return ds.limit(1).count() > 0
