"""Stage `triplets` (Stage 2's pre-stage): the triplets manifest -> `triplet_embeddings`.

Incremental like the data stages: a triplet whose images' bytes, texts, condition text
and embedder are unchanged is skipped before any model runs.
"""
from __future__ import annotations

import ray

from ops.triplets import TRIPLET_COLUMNS, TripletEmbedOp, hash_triplets, staged_schema
from ops.schemas import triplet_embeddings_schema
from pipelines.common import StageSummary, begin_model_stage, plain, stage_and_commit
from pipelines.embed import check_embedder
from pipelines.ingest import ManifestError, read_manifest
from pipelines.stages import any_rows, keep_changed


def text_encoder_name(cfg) -> str:
    te = cfg.models.text_encoder
    return te.name_or_path if te.kind == "t5" else cfg.models.embedder.name_or_path


def run(cfg) -> StageSummary:
    lake, summary = begin_model_stage(cfg, "triplets", source=None)
    check_embedder(cfg, lake, table="triplet_embeddings", column="z_query")
    model = cfg.models.embedder
    precomputed = cfg.train.text_conditions == "precomputed"
    if cfg.train_stage2.condition_text not in ("instruction", "description"):
        raise ManifestError(f"train_stage2.condition_text={cfg.train_stage2.condition_text!r}: "
                            f"expected 'instruction' or 'description'")
    ds = read_manifest(cfg.catalogue.triplets, lake.s3, required=TRIPLET_COLUMNS, optional=(), what="triplets")
    summary.read = ds.count()
    constants = {"model": model.name_or_path}
    if precomputed:
        constants["text_encoder"] = text_encoder_name(cfg)
    todo = (
        ds.map_batches(hash_triplets, batch_format="pyarrow", fn_kwargs=dict(
            s3=lake.s3, limits=plain(cfg.images), condition_text=cfg.train_stage2.condition_text))
        .map_batches(keep_changed, batch_format="pyarrow", fn_kwargs=dict(
            table_uri=lake.uri("triplet_embeddings"), storage_options=lake.storage_options, key="triplet_id",
            compare={c: c for c in ("source_sha256", "target_sha256", "instruction", "target_description",
                                    "cond_text")},
            constants=constants))
    )
    if not any_rows(todo):
        summary.skipped = summary.read
        return summary
    staged = (
        todo.map_batches(
            TripletEmbedOp, fn_constructor_kwargs=dict(
                model=plain(model), s3=lake.s3,
                text_encoder=plain(cfg.models.text_encoder) if precomputed else None),
            compute=ray.data.ActorPoolStrategy(size=cfg.triplets.num_actors), batch_size=cfg.triplets.batch_size,
            batch_format="pyarrow", num_cpus=cfg.triplets.num_cpus_per_actor,
            num_gpus=cfg.triplets.num_gpus_per_actor)
    )
    schema = triplet_embeddings_schema(model.dim)
    counts = stage_and_commit(staged, lake, "triplets", staged_schema(model.dim), "triplet_embeddings",
                              ["triplet_id"], schema, reject_key="triplet_id")
    summary.written, summary.rejected = counts["written"], counts["rejected"]
    summary.skipped = summary.read - summary.written - summary.rejected
    return summary
