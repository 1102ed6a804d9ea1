"""Stage `caption`: images with no caption for their current sha256 (and model) -> `captions`."""
from __future__ import annotations

import ray

from ops.caption import OUTPUT_SCHEMA, CaptionOp
from ops.schemas import CAPTIONS
from pipelines.common import StageSummary, begin_model_stage, plain, stage_and_commit
from pipelines.stages import any_rows, keep_changed, read_table


def run(cfg) -> StageSummary:
    started = begin_model_stage(cfg, "caption")
    if started is None:
        return StageSummary("caption")
    lake, summary = started
    model = cfg.models.captioner
    todo = read_table(lake, "images", ["image_id", "uri", "sha256", "source_caption"]).map_batches(
        keep_changed, batch_format="pyarrow", fn_kwargs=dict(
            table_uri=lake.uri("captions"), storage_options=lake.storage_options,
            compare={"sha256": "sha256"}, constants={"model": model.name_or_path}))
    if not any_rows(todo):
        summary.skipped = summary.read
        return summary
    staged = (
        todo.map_batches(
            CaptionOp, fn_constructor_kwargs=dict(model=plain(model), caption=plain(cfg.caption), s3=lake.s3),
            compute=ray.data.ActorPoolStrategy(size=cfg.caption.num_actors), batch_size=cfg.caption.batch_size,
            batch_format="numpy", num_cpus=cfg.caption.num_cpus_per_actor, num_gpus=cfg.caption.num_gpus_per_actor)
    )
    counts = stage_and_commit(staged, lake, "caption", OUTPUT_SCHEMA, "captions", ["image_id"], CAPTIONS)
    summary.written, summary.rejected = counts["written"], counts["rejected"]
    summary.skipped = summary.read - summary.written - summary.rejected
    return summary
