"""The one loop of every model op, and the one way rows become Arrow.

A model op takes a pyarrow batch of rows that name images (a uri and the sha256 ingest
recorded), loads each row's images, records why a row cannot be used, runs its model
once on the good rows, and returns a pyarrow table in its output schema, rejected rows
included (with their reason, vectors null), so that the stage commits both in one go.
Subclasses say which columns name the images (`image_columns`) and what the model
makes of the good rows (`compute`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from model.errors import PipelineError
from ops.images import ImageRejected, load_image
from ops.tables import TableReader


class EmbeddingSizeError(PipelineError):
    pass


# The model op this process built last, by its key (run_kept_op).
_KEPT: dict = {}


def run_kept_op(batch: pa.Table, op: type, args: tuple, kwargs: dict, key: str) -> pa.Table:
    """`op(*args, **kwargs)(batch)`, the op built once per process and kept for the next
    batch or stage with the same `key` (conf ray.model_ops: tasks): a task in a worker
    that has run one before pays neither the imports nor the loads. One op at a time: the
    last one's models go before the next one's load."""
    built = _KEPT.get(key)
    if built is None:
        _KEPT.clear()
        built = _KEPT[key] = op(*args, **kwargs)
    return built(batch)


def vectors_to_arrow(vectors: np.ndarray, dim: int, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise EmbeddingSizeError(f"expected vectors of size {dim}, got an array of shape {vectors.shape}")
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim, mask=mask)


def rows_to_arrow(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; vectors as numpy arrays or None) -> a table of `schema`. A fixed-size
    list column is stacked in one array, null where a row has none."""
    columns = []
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if pa.types.is_fixed_size_list(f.type):
            d = f.type.list_size
            valid = np.array([v is not None for v in values], dtype=bool)
            flat = np.zeros((len(values), d), np.float32)
            for i, v in enumerate(values):
                if v is not None:
                    v = np.asarray(v, dtype=np.float32).reshape(-1)
                    if v.shape[0] != d:
                        raise EmbeddingSizeError(f"{f.name}: expected vectors of size {d}, got {v.shape[0]}")
                    flat[i] = v
            columns.append(vectors_to_arrow(flat, d, valid))
        elif pa.types.is_list(f.type):
            columns.append(
                pa.array([None if v is None else np.asarray(v, np.float32) for v in values], f.type)
            )
        else:
            columns.append(pa.array(values, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


class ImageRowsOp:
    """Loads each row's images, runs `compute` on the rows that have them, assembles the output.

    `image_columns`: (uri column, sha256 column) of each image a row names, in order;
    none for rows without images (text queries). A row that arrives with a
    reject_reason, or whose image is missing, changed since ingest or corrupt, is not
    computed: `rejected(row)` gives its output rows.
    """

    image_columns: Sequence[tuple[str, str]] = (("uri", "sha256"),)
    schema: pa.Schema

    def __init__(self, tables: TableReader | None, background: str):
        self.tables = tables
        self.s3 = tables.s3 if tables is not None else None
        self.background = background  # conf images.alpha_background

    def compute(self, rows: list[dict], images: list[tuple[Image.Image, ...]]) -> list[dict]:
        """Output rows of the good input rows (`images[i]` are row i's images)."""
        raise NotImplementedError

    def rejected(self, row: dict) -> list[dict]:
        """Output rows of an input row that could not be used (it has a reject_reason)."""
        return [row]

    def __call__(self, batch: pa.Table) -> pa.Table:
        good, images, out = [], [], []
        for row in batch.to_pylist():
            if not row.get("reject_reason"):
                try:
                    images.append(
                        tuple(
                            load_image(row[u], self.s3, self.background, expected_sha256=row[h])
                            for u, h in self.image_columns
                        )
                    )
                    good.append(row)
                    continue
                except ImageRejected as e:
                    row["reject_reason"] = str(e)
            out += self.rejected(row)
        return rows_to_arrow((self.compute(good, images) if good else []) + out, self.schema)
