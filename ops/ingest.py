"""Ingest: a batch of manifest rows -> `images` rows (sha256, size), or a reject reason.

Two steps, so that an unchanged night reads no image: `stamp_rows` asks the store only
for each file's size and modification time (or takes the manifest's ETag), the stage
drops rows whose (uri, caption, stamp) `images` already holds, and `IngestOp` reads,
hashes and probes the rest.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from ops.images import ImageLimits, ImageRejected, probe_image, sha256_hex
from ops.schemas import IMAGES, with_reject_reason
from ops.storage import filesystem, read_bytes
from ops.tables import TableReader

OUTPUT_SCHEMA = with_reject_reason(IMAGES)
# Manifest rows as IngestOp reads them: the manifest's own columns, plus the stamp.
STAMPED = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("caption", pa.string()),
                     ("stamp", pa.string())])


def file_stamp(info: pafs.FileInfo) -> str | None:
    """"size:<bytes>;mtime_ns:<ns>" of a file, or None when the store gave no time or no file."""
    if info.type != pafs.FileType.File or info.mtime_ns is None or info.size is None:
        return None
    return f"size:{info.size};mtime_ns:{info.mtime_ns}"


def stamp_rows(batch: pa.Table, s3: dict | None, threads: int) -> pa.Table:
    """A manifest batch as STAMPED: each row's stamp is "etag:<etag>" where the manifest
    has an etag (an S3 Inventory report does: no request at all), else the store's size
    and modification time (one stat, or one HEAD on S3, in `threads` threads), else null.
    A file the store cannot find gets null: IngestOp then records it missing."""
    n = batch.num_rows
    uris = batch.column("uri").to_pylist()
    etags = batch.column("etag").to_pylist() if "etag" in batch.schema.names else [None] * n
    stamps: list[str | None] = [f"etag:{e}" if e else None for e in etags]

    def stat(i: int) -> str | None:
        try:
            fs, path = filesystem(str(uris[i]), s3)
            return file_stamp(fs.get_file_info(path))
        except (OSError, ValueError):
            return None

    todo = [i for i in range(n) if stamps[i] is None and uris[i]]
    if threads > 1 and len(todo) > 1:
        with ThreadPoolExecutor(threads) as pool:
            found = list(pool.map(stat, todo))
    else:
        found = [stat(i) for i in todo]
    for i, stamp in zip(todo, found):
        stamps[i] = stamp
    caption = batch.column("caption") if "caption" in batch.schema.names else pa.nulls(n, pa.string())
    columns = [batch.column("image_id"), batch.column("uri"), caption]
    columns = [pc.cast(c, pa.string()) for c in columns] + [pa.array(stamps, pa.string())]
    return pa.table(columns, schema=STAMPED)


class IngestOp:
    """Reads each image once: its hash keys re-indexing, its header gives the size."""

    def __init__(self, conf: dict, tables: TableReader | None, duplicate_ids: frozenset[str] = frozenset()):
        self.limits = ImageLimits.from_conf(conf["images"])
        self.s3 = tables.s3 if tables is not None else None
        # Ids that occur more than once in the manifest: which row is right is unknowable,
        # so every row of such an id is rejected rather than one picked at random.
        self.duplicate_ids = duplicate_ids

    def process_row(self, image_id: Any, uri: Any, caption: Any, stamp: str | None = None) -> dict:
        row = {"image_id": "" if image_id is None else str(image_id).strip(), "uri": uri, "sha256": None,
               "width": None, "height": None, "source_caption": caption or None, "stamp": stamp,
               "reject_reason": None}
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
        rows = [self.process_row(r["image_id"], r["uri"], r.get("caption"), r.get("stamp"))
                for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
