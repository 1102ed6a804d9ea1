"""Stage `triplets` (Stage 2's pre-stage): the triplets manifest -> `triplet_embeddings`.

Incremental like the data stages: a triplet whose images' bytes, texts, condition text
(or, when the describer writes it, the describer), embedder and text encoder are
unchanged is skipped before any model runs.
"""
from __future__ import annotations

from model.mllm import embedder_id
from model.text_encoder import text_encoder_name
from ops.schemas import triplet_embeddings_schema
from ops.rank import describer_id
from ops.schemas import TRIPLET_COLUMNS
from ops.triplets import DESCRIBED, TripletEmbedOp, hash_triplets, staged_schema
from pipelines.common import (
    StageOutput,
    check_embedder,
    map_with_model,
    read_manifest,
    select_work,
    stage_and_commit,
)
from pipelines.context import RunContext, Summary

COMPARED = ("source_sha256", "target_sha256", "instruction", "target_description")


def run(ctx: RunContext) -> Summary:
    ctx.start_ray()
    cfg, lake = ctx.cfg, ctx.lake
    summary = Summary("triplets")
    check_embedder(ctx, table="triplet_embeddings", column="z_query")
    model = cfg.models.embedder
    ds = read_manifest(
        cfg.catalogue.triplets, lake.s3, required=TRIPLET_COLUMNS, optional=(), what="triplets"
    )
    summary.read = ds.count()
    described = cfg.train_stage2.condition_text == DESCRIBED
    describer = describer_id(ctx.conf["models"]["describer"], ctx.conf["rank"]) if described else None
    # A null describer: the condition is the manifest's, compared as cond_text below.
    constants = {"model": embedder_id(ctx.conf["models"]["embedder"]), "describer": describer}
    compared = COMPARED if described else (*COMPARED, "cond_text")
    if cfg.train.text_conditions == "precomputed":
        constants["text_encoder"] = text_encoder_name(
            ctx.conf["models"]["text_encoder"], ctx.conf["models"]["embedder"]
        )
    hashed = ds.map_batches(
        hash_triplets,
        batch_format="pyarrow",
        fn_kwargs=dict(
            tables=lake, limits=ctx.conf["images"], condition_text=cfg.train_stage2.condition_text
        ),
    )
    out = StageOutput("triplets", staged_schema(model.dim), "triplet_embeddings", ("triplet_id",),
                      triplet_embeddings_schema(model.dim), reject_key="triplet_id")
    todo = select_work(ctx, summary, hashed, out, table="triplet_embeddings", key="triplet_id",
                       compare={c: c for c in compared}, constants=constants)
    if todo is None:
        return summary
    staged = map_with_model(todo, ctx, TripletEmbedOp, "triplets")
    counts = stage_and_commit(staged, ctx, out)
    summary.written, summary.rejected = counts["written"], counts["rejected"]
    summary.skipped = summary.read - summary.written - summary.rejected
    return summary
