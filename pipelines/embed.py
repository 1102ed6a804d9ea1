"""Stage `embed`: images + captions -> `embeddings` of kind image (gallery) and pair (Stage 1)."""
from __future__ import annotations

from model.mllm import embedder_id
from ops.embed import EmbedOp, attach_captions
from ops.schemas import embeddings_schema, with_reject_reason
from pipelines.common import begin_model_stage, check_embedder, map_with_model, read_table, select_work
from pipelines.common import StageOutput, stage_and_commit
from pipelines.context import RunContext, Summary


def run(ctx: RunContext) -> Summary:
    summary = begin_model_stage(ctx, "embed")
    if summary is None:
        return Summary("embed")
    check_embedder(ctx)
    cfg, lake = ctx.cfg, ctx.lake
    model = cfg.models.embedder
    schema = embeddings_schema(model.dim)
    captioned = read_table(lake, "images", ["image_id", "uri", "sha256"]).map_batches(
        attach_captions, batch_format="pyarrow",
        fn_kwargs=dict(tables=lake, short_fraction=cfg.embed.pair_short_fraction))
    out = StageOutput("embed", with_reject_reason(schema), "embeddings", ("image_id", "kind"), schema)
    todo = select_work(ctx, summary, captioned, out, table="embeddings",
                       compare={"sha256": "sha256", "text": "pair_text"},
                       constants={"model": embedder_id(ctx.conf["models"]["embedder"])},
                       where="kind = 'pair'")
    if todo is None:
        return summary
    staged = map_with_model(todo, ctx, EmbedOp, "embed")
    counts = stage_and_commit(staged, ctx, out)
    summary.written, summary.rejected = counts["written"] // 2, counts["rejected"]
    summary.extra["vectors"] = counts["written"]
    summary.skipped = summary.read - summary.written - summary.rejected
    return summary
