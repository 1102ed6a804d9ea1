"""Stage `ingest`: catalogue manifest -> `images` (image_id, uri, sha256, width, height)."""
from __future__ import annotations

import pyarrow as pa
import ray

from ops.ingest import OUTPUT_SCHEMA, IngestOp
from ops.schemas import IMAGES
from pipelines.common import StageOutput, duplicate_ids, read_manifest, select_work, stage_and_commit
from pipelines.context import RunContext, Summary
from pipelines.lake import delete_absent

# The tables whose rows belong to an image (keyed by its image_id).
IMAGE_TABLES = ("captions", "embeddings")


def run(ctx: RunContext) -> Summary:
    cfg, lake = ctx.cfg, ctx.lake
    ctx.start_ray()
    summary = Summary("ingest")
    manifest = read_manifest(cfg.catalogue.manifest, lake.s3)
    summary.read = manifest.count()
    dups = duplicate_ids(manifest, "image_id", cfg.ingest.duplicate_check_partitions, summary.read,
                         cfg.ingest.duplicate_check_local_max_rows)
    staged = manifest.map_batches(
        IngestOp,
        fn_constructor_args=(ctx.conf, lake),
        fn_constructor_kwargs=dict(duplicate_ids=dups),
        compute=ray.data.ActorPoolStrategy(size=cfg.ingest.num_actors),
        batch_size=cfg.ingest.batch_size,
        batch_format="pyarrow",
        num_cpus=1,
    )
    out = StageOutput("ingest", OUTPUT_SCHEMA, "images", ("image_id",), IMAGES)
    staged = select_work(ctx, summary, staged, out, table="images",
                         compare={"sha256": "sha256", "uri": "uri", "source_caption": "source_caption"})
    if staged is None:
        summary.rejected = summary.extra.get("rejected", 0)
    else:
        counts = stage_and_commit(staged, ctx, out)
        summary.written, summary.rejected = counts["written"], counts["rejected"]
        summary.skipped = summary.read - summary.written - counts["rejected"]
    if cfg.ingest.delete_missing:
        delete_missing(ctx, summary, manifest)
    return summary


def delete_missing(ctx: RunContext, summary: Summary, manifest: ray.data.Dataset) -> None:
    """Images no longer in the manifest leave `captions` and `embeddings` (so the gallery
    stops ranking them), then `images`: one keyed commit per table. A night where no
    image left costs one anti-join against `images`, nothing more."""
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
