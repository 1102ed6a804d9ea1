"""Stage `conditions` (train.text_conditions: precomputed): Stage 1's pairs with their
text tokens c = E_text(caption) -> `stage1_examples`, incremental by image bytes, text
and text encoder. Stage 1 then reads this table instead of `embeddings`."""
from __future__ import annotations

import pyarrow as pa
import ray

from ops.conditions import ConditionOp
from ops.schemas import REJECT_REASON, stage1_examples_schema
from pipelines.common import StageSummary, begin_model_stage, plain, stage_and_commit
from pipelines.stages import keep_changed, read_table
from pipelines.triplets import text_encoder_name

PAIRS = "kind = 'pair'"


def _label(batch: pa.Table, encoder: str, names: list[str]) -> pa.Table:
    n = batch.num_rows
    return (batch.append_column("text_encoder", pa.array([encoder] * n, pa.string()))
            .append_column(REJECT_REASON, pa.nulls(n, pa.string())).select(names))


def run(cfg) -> StageSummary:
    started = begin_model_stage(cfg, "conditions", source="embeddings", source_filter=PAIRS, needs="embed")
    if started is None:
        return StageSummary("conditions")
    lake, summary = started
    schema = stage1_examples_schema(cfg.models.embedder.dim)
    encoder = text_encoder_name(cfg)
    staged = (
        read_table(lake, "embeddings", ["image_id", "sha256", "text", "vector"], filter=PAIRS)
        .map_batches(keep_changed, batch_format="pyarrow", fn_kwargs=dict(
            table_uri=lake.uri("stage1_examples"), storage_options=lake.storage_options,
            compare={"sha256": "sha256", "text": "text"}, constants={"text_encoder": encoder}))
        .map_batches(
            ConditionOp, fn_constructor_kwargs=dict(text_encoder=plain(cfg.models.text_encoder),
                                                    embedder=plain(cfg.models.embedder), text_column="text"),
            compute=ray.data.ActorPoolStrategy(size=cfg.conditions.num_actors), batch_size=cfg.conditions.batch_size,
            batch_format="pyarrow", num_cpus=cfg.conditions.num_cpus_per_actor,
            num_gpus=cfg.conditions.num_gpus_per_actor)
        .map_batches(_label, batch_format="pyarrow", fn_kwargs=dict(encoder=encoder, names=schema.append(REJECT_REASON).names))
    )
    counts = stage_and_commit(staged, lake, "conditions", schema.append(REJECT_REASON), "stage1_examples",
                              ["image_id"], schema)
    summary.written = counts["written"]
    summary.skipped = summary.read - summary.written
    return summary
