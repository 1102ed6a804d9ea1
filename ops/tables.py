"""What per-batch functions need of the lake, as an interface: keyed lookups and scans.

Ops never open tables themselves: they are handed a `TableReader` (pipelines/lake.py
`Lake` is the one implementation, Lance on a local disk or S3), which also carries the
store's credentials (`s3`) for reading images. One object, picklable, the same shape
for every Ray function.
"""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa


class TableReader(Protocol):
    s3: dict

    def lookup(self, table: str, ids: Sequence[str], columns: Sequence[str], key: str = "image_id",
               where: str | None = None) -> dict[str, dict]:
        """Rows of `table` whose `key` is in `ids`, as key -> row (a missing table: {})."""

    def scan(self, table: str, columns: Sequence[str], filter: str | None = None,
             batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """`table`'s rows in batches of at most `batch_size` (a missing table: none)."""


CHANGE = "change"  # the column classify_changes adds: new, changed, unchanged or rejected


def classify_changes(batch: pa.Table, tables: TableReader, table: str, compare: dict[str, str],
                     constants: dict[str, str] | None = None, where: str | None = None,
                     key: str = "image_id", unknown_if_null: Sequence[str] = ()) -> pa.Table:
    """`batch` with a `change` column: `new` (a key `table` lacks), `changed` (held with
    other values), `unchanged`, or `rejected` (the row carries a reject_reason).

    `compare` maps a table column to the batch column it must equal; `constants` a table
    column to the value it must have (the model that wrote it). A null in one of the batch
    columns `unknown_if_null` proves nothing (a file the store gave no stamp for): the row
    counts as changed. One keyed lookup per batch, so nothing of the table is collected
    anywhere.
    """
    ids = batch.column(key).to_pylist()
    existing = tables.lookup(
        table, [i for i in ids if i], list(compare) + list(constants or {}), key=key, where=where
    )
    batch_cols = {c: batch.column(c).to_pylist() for c in compare.values()}
    rejects = (
        batch.column("reject_reason").to_pylist()
        if "reject_reason" in batch.schema.names
        else [None] * len(ids)
    )
    nullable = [batch.column(c).to_pylist() for c in unknown_if_null]
    unknown = [any(v is None for v in vals) for vals in zip(*nullable)]
    unknown = unknown or [False] * len(ids)
    kinds = []
    for n, row_key in enumerate(ids):
        row = existing.get(row_key)
        if rejects[n] is not None:
            kinds.append("rejected")
        elif row is None:
            kinds.append("new")
        elif unknown[n]:
            kinds.append("changed")
        elif all(row[t] == batch_cols[b][n] for t, b in compare.items()) and all(
            row[t] == v for t, v in (constants or {}).items()
        ):
            kinds.append("unchanged")
        else:
            kinds.append("changed")
    return batch.append_column(CHANGE, pa.array(kinds, pa.string()))


def keep_changed(
    batch: pa.Table,
    tables: TableReader,
    table: str,
    compare: dict[str, str],
    constants: dict[str, str] | None = None,
    where: str | None = None,
    key: str = "image_id",
    unknown_if_null: Sequence[str] = (),
) -> pa.Table:
    """Rows of `batch` that `table` lacks or holds with other values (classify_changes);
    rows to reject always pass, so that the stage records them."""
    classified = classify_changes(batch, tables, table, compare, constants, where, key, unknown_if_null)
    keep = np.array([k != "unchanged" for k in classified.column(CHANGE).to_pylist()], dtype=bool)
    return batch.filter(pa.array(keep))


def count_changes(batch: pa.Table) -> pa.Table:
    """One row per kind of change in a classified batch, with its count (for dry runs)."""
    kinds = batch.column(CHANGE).to_pylist()
    names = sorted(set(kinds))
    return pa.table({CHANGE: names, "rows": [kinds.count(n) for n in names]})
