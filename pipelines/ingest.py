"""Stage `ingest`: catalogue manifest -> `images` (image_id, uri, sha256, width, height, stamp).

An unchanged night reads no image: the store's size and modification time of each file
(or the manifest's ETag) are compared with the `stamp` `images` holds first, and only new
or changed files are read, hashed and probed (ops/ingest.py).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from ops.ingest import OUTPUT_SCHEMA, IngestOp, stamp_rows
from ops.schemas import IMAGES
from ops.tables import keep_changed
from pipelines.common import (ManifestError, StageOutput, duplicate_ids, in_batches, read_manifest,
                              select_work, stage_and_commit)
from pipelines.context import RunContext, Summary
from pipelines.lake import delete_absent

# The tables whose rows belong to an image (keyed by its image_id).
IMAGE_TABLES = ("captions", "embeddings")
MANIFEST_OPTIONAL = ("caption", "etag", "deleted")
# What the manifest's `deleted` column may hold (any case; null counts as false).
DELETED_TRUE, DELETED_FALSE = ("true", "1"), ("false", "0", "")


def run(ctx: RunContext) -> Summary:
    cfg, lake = ctx.cfg, ctx.lake
    ctx.start_ray()
    summary = Summary("ingest")
    uri = cfg.catalogue.manifest
    manifest = read_manifest(uri, lake.s3, optional=MANIFEST_OPTIONAL)
    if "deleted" in manifest.schema().names:
        check_markers(manifest, uri)
        manifest = manifest.map_batches(live_rows, batch_format="pyarrow")
    summary.read = manifest.count()
    dups = duplicate_ids(manifest, "image_id", cfg.ingest.duplicate_check_partitions, summary.read,
                         cfg.ingest.duplicate_check_local_max_rows)
    stamped = in_batches(manifest, cfg.ingest.batch_size).map_batches(
        stamp_rows, batch_format="pyarrow", batch_size=cfg.ingest.batch_size,
        fn_kwargs=dict(s3=lake.s3, threads=cfg.ingest.stat_threads))
    out = StageOutput("ingest", OUTPUT_SCHEMA, "images", ("image_id",), IMAGES)
    if not ctx.dry_run:
        lake.add_missing_columns("images", IMAGES)  # a lake from before stamps: all null, hashed once
    same = {"uri": "uri", "source_caption": "caption"}
    unread = select_work(ctx, summary, stamped, out, table="images", compare={**same, "stamp": "stamp"},
                         unknown_if_null=("stamp",))
    if unread is None:
        summary.rejected = summary.extra.get("rejected", 0)
    else:
        staged = unread.map_batches(
            IngestOp,
            fn_constructor_args=(ctx.conf, lake),
            fn_constructor_kwargs=dict(duplicate_ids=dups),
            compute=ray.data.ActorPoolStrategy(size=cfg.ingest.num_actors),
            batch_size=cfg.ingest.batch_size,
            batch_format="pyarrow",
            num_cpus=1,
        )
        # A touched file with the same bytes is rewritten only for its new stamp; a store
        # that gives no stamp falls back to this comparison of the hash.
        staged = staged.map_batches(keep_changed, batch_format="pyarrow", fn_kwargs=dict(
            tables=lake, table="images", compare={"sha256": "sha256", "uri": "uri",
                                                  "source_caption": "source_caption", "stamp": "stamp"}))
        counts = stage_and_commit(staged, ctx, out)
        summary.written, summary.rejected = counts["written"], counts["rejected"]
        summary.skipped = summary.read - summary.written - counts["rejected"]
    if cfg.ingest.delete_missing:
        delete_missing(ctx, summary, manifest)
    return summary


def deleted_flags(batch: pa.Table) -> pa.Array:
    """The manifest's `deleted` column, trimmed and lower-cased, null as empty."""
    flags = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(batch.column("deleted"), pa.string())))
    return pc.fill_null(flags, "")


def bad_markers(batch: pa.Table) -> pa.Table:
    """The rows whose `deleted` is none of true/1/false/0/empty."""
    return batch.select(["image_id", "deleted"]).filter(
        pc.invert(pc.is_in(deleted_flags(batch), pa.array(DELETED_TRUE + DELETED_FALSE))))


def live_rows(batch: pa.Table) -> pa.Table:
    """The manifest rows not marked deleted."""
    keep = pc.invert(pc.is_in(deleted_flags(batch), pa.array(DELETED_TRUE)))
    return batch.filter(keep).drop_columns(["deleted"])


def check_markers(manifest: ray.data.Dataset, uri: str) -> None:
    """A `deleted` value other than true/1/false/0/empty stops the stage before anything
    is done (a typo must neither delete nor keep an image silently); found by a pass over
    the two columns, and raised here on the driver, naming the row."""
    markers = manifest.select_columns(["image_id", "deleted"])
    bad = markers.map_batches(bad_markers, batch_format="pyarrow").take(1)
    if bad:
        raise ManifestError(f"manifest {uri}: image_id {bad[0]['image_id']!r} has "
                            f"deleted={bad[0]['deleted']!r}; expected one of true, 1, false, 0 or empty")


def delete_missing(ctx: RunContext, summary: Summary, manifest: ray.data.Dataset) -> None:
    """Images no longer in the manifest (or marked deleted there) leave `captions` and
    `embeddings` (so the gallery stops ranking them), then `images`: one keyed commit per
    table. A night where no image left costs one anti-join against `images`, nothing more."""
    lake, cfg = ctx.lake, ctx.cfg
    schema = pa.schema([("image_id", pa.string())])

    def manifest_ids() -> pa.RecordBatchReader:
        def batches():
            for b in manifest.select_columns(["image_id"]).iter_batches(
                batch_format="pyarrow", batch_size=cfg.ingest.delete_batch_size
            ):
                yield from b.cast(schema).to_batches()

        return pa.RecordBatchReader.from_batches(schema, batches())

    def dependents_first():
        for table in IMAGE_TABLES:
            gone = delete_absent(lake, table, "image_id", manifest_ids())
            if gone:
                summary.extra[f"deleted_{table}"] = gone

    summary.extra["deleted"] = delete_absent(lake, "images", "image_id", manifest_ids(),
                                             cfg.ingest.max_delete_fraction, ctx.dry_run,
                                             before_commit=dependents_first)
