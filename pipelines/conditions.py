"""Stage `conditions` (train.text_conditions: precomputed): Stage 1's pairs with their
text tokens c = E_text(caption) -> `stage1_examples`, incremental by image bytes, text
and text encoder. Stage 1 then reads this table instead of `embeddings`."""
from __future__ import annotations

import pyarrow as pa

from model.text_encoder import text_encoder_name
from ops.conditions import ConditionOp
from ops.schemas import REJECT_REASON, stage1_examples_schema
from pipelines.common import (
    StageOutput,
    begin_model_stage,
    map_with_model,
    read_table,
    select_work,
    stage_and_commit,
)
from pipelines.context import RunContext, Summary

PAIRS = "kind = 'pair'"


def _label(batch: pa.Table, encoder: str, names: list[str]) -> pa.Table:
    n = batch.num_rows
    return (batch.append_column("text_encoder", pa.array([encoder] * n, pa.string()))
            .append_column(REJECT_REASON, pa.nulls(n, pa.string())).select(names))


def run(ctx: RunContext) -> Summary:
    summary = begin_model_stage(ctx, "conditions", source="embeddings", source_filter=PAIRS, needs="embed")
    if summary is None:
        return Summary("conditions")
    lake = ctx.lake
    schema = stage1_examples_schema(ctx.cfg.models.embedder.dim)
    encoder = text_encoder_name(ctx.conf["models"]["text_encoder"], ctx.conf["models"]["embedder"])
    pairs = read_table(lake, "embeddings", ["image_id", "sha256", "text", "vector"], filter=PAIRS)
    out = StageOutput("conditions", schema.append(REJECT_REASON), "stage1_examples", ("image_id",), schema)
    todo = select_work(ctx, summary, pairs, out, table="stage1_examples",
                       compare={"sha256": "sha256", "text": "text"}, constants={"text_encoder": encoder})
    if todo is None:
        return summary
    staged = map_with_model(todo, ctx, ConditionOp, "conditions", text_column="text").map_batches(
        _label,
        batch_format="pyarrow",
        fn_kwargs=dict(encoder=encoder, names=schema.append(REJECT_REASON).names),
    )
    counts = stage_and_commit(staged, ctx, out)
    summary.written = counts["written"]
    summary.skipped = summary.read - summary.written
    return summary
