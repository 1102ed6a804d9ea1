"""Ingest: a batch of manifest rows -> `images` rows (sha256, size), or a reject reason."""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from ops.images import ImageLimits, ImageRejected, probe_image, sha256_hex
from ops.schemas import IMAGES, with_reject_reason
from ops.storage import read_bytes
from ops.tables import TableReader

OUTPUT_SCHEMA = with_reject_reason(IMAGES)


class IngestOp:
    """Reads each image once: its hash keys re-indexing, its header gives the size."""

    def __init__(self, conf: dict, tables: TableReader | None, duplicate_ids: frozenset[str] = frozenset()):
        self.limits = ImageLimits.from_conf(conf["images"])
        self.s3 = tables.s3 if tables is not None else None
        # Ids that occur more than once in the manifest: which row is right is unknowable,
        # so every row of such an id is rejected rather than one picked at random.
        self.duplicate_ids = duplicate_ids

    def process_row(self, image_id: Any, uri: Any, caption: Any) -> dict:
        row = {"image_id": "" if image_id is None else str(image_id).strip(), "uri": uri, "sha256": None,
               "width": None, "height": None, "source_caption": caption or None, "reject_reason": None}
        try:
            if not row["image_id"]:
                raise ImageRejected("empty image_id")
            if row["image_id"] in self.duplicate_ids:
                raise ImageRejected("duplicate image_id in the manifest")
            if not uri:
                raise ImageRejected("empty uri")
            try:
                data = read_bytes(str(uri), self.s3)
            except FileNotFoundError:
                raise ImageRejected(f"missing file: {uri}") from None
            except OSError as e:
                raise ImageRejected(f"cannot read {uri}: {e}") from None
            row["width"], row["height"] = probe_image(data, self.limits)
            row["sha256"] = sha256_hex(data)
        except ImageRejected as e:
            row["reject_reason"] = str(e)
        return row

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.process_row(r["image_id"], r["uri"], r.get("caption")) for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
