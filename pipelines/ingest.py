"""Stage `ingest`: catalogue manifest -> `images` (image_id, uri, sha256, width, height)."""
from __future__ import annotations

import ray

from ops.ingest import OUTPUT_SCHEMA, IngestOp
from ops.schemas import IMAGES
from pipelines.common import duplicate_ids, read_manifest, select_work, stage_and_commit
from pipelines.context import RunContext, Summary


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
    staged = select_work(ctx, summary, staged, table="images",
                         compare={"sha256": "sha256", "uri": "uri", "source_caption": "source_caption"})
    if staged is None:
        summary.rejected = summary.extra.get("rejected", 0)
        return summary
    counts = stage_and_commit(staged, lake, "ingest", OUTPUT_SCHEMA, "images", ["image_id"], IMAGES)
    summary.written, summary.rejected = counts["written"], counts["rejected"]
    summary.skipped = summary.read - summary.written - counts["rejected"]
    return summary
