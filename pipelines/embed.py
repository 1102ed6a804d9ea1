"""Stage `embed`: images + captions -> `embeddings` of kind image (gallery) and pair (Stage 1)."""
from __future__ import annotations

import pyarrow as pa
import ray
from transformers import AutoConfig

from ops.embed import EmbeddingSizeError, EmbedOp, uses_short_caption
from ops.schemas import embeddings_schema, with_reject_reason
from pipelines.common import StageSummary, begin_model_stage, plain, stage_and_commit
from pipelines.lake import Lake, check_vector_dim, lookup, open_dataset
from pipelines.stages import any_rows, keep_changed, read_table


def attach_captions(batch: pa.Table, captions_uri: str, storage_options: dict, short_fraction: float) -> pa.Table:
    """Adds each image's Stage 1 text (pair_text): its long or short caption, by the
    mixed-length draw; images with no caption for their current bytes wait for one."""
    ids = batch.column("image_id").to_pylist()
    caps = lookup(open_dataset(captions_uri, storage_options), ids, ["sha256", "caption_long", "caption_short"])
    shas = batch.column("sha256").to_pylist()
    keep, texts, kinds = [], [], []
    for image_id, sha in zip(ids, shas):
        c = caps.get(image_id)
        if c is None or c["sha256"] != sha:
            keep.append(False)
            continue
        short = uses_short_caption(image_id, short_fraction) and bool(c["caption_short"])
        keep.append(True)
        texts.append(c["caption_short"] if short else c["caption_long"])
        kinds.append("short" if short else "long")
    out = batch.filter(pa.array(keep, type=pa.bool_()))
    return out.append_column("pair_text", pa.array(texts, pa.string())).append_column(
        "pair_caption_kind", pa.array(kinds, pa.string()))


def check_embedder(cfg, lake: Lake, table: str = "embeddings", column: str = "vector") -> None:
    """Refuses a wrong-sized embedder or table (of the embedder's vectors) before any image is read."""
    model = cfg.models.embedder
    found = AutoConfig.from_pretrained(model.name_or_path).get_text_config().hidden_size
    if found != model.dim:
        raise EmbeddingSizeError(f"embedder {model.name_or_path!r} gives vectors of size {found}, "
                                 f"but models.embedder.dim is {model.dim}: fix the config or the checkpoint")
    ds = lake.open(table)
    if ds is not None:
        check_vector_dim(ds, model.dim, lake.uri(table), column)


def run(cfg) -> StageSummary:
    started = begin_model_stage(cfg, "embed")
    if started is None:
        return StageSummary("embed")
    lake, summary = started
    check_embedder(cfg, lake)
    model = cfg.models.embedder
    schema = embeddings_schema(model.dim)
    todo = (
        read_table(lake, "images", ["image_id", "uri", "sha256"])
        .map_batches(attach_captions, batch_format="pyarrow", fn_kwargs=dict(
            captions_uri=lake.uri("captions"), storage_options=lake.storage_options,
            short_fraction=cfg.embed.pair_short_fraction))
        .map_batches(keep_changed, batch_format="pyarrow", fn_kwargs=dict(
            table_uri=lake.uri("embeddings"), storage_options=lake.storage_options,
            compare={"sha256": "sha256", "text": "pair_text"}, constants={"model": model.name_or_path},
            where="kind = 'pair'"))
    )
    if not any_rows(todo):
        summary.skipped = summary.read
        return summary
    staged = (
        todo.map_batches(
            EmbedOp, fn_constructor_kwargs=dict(model=plain(model), s3=lake.s3),
            compute=ray.data.ActorPoolStrategy(size=cfg.embed.num_actors), batch_size=cfg.embed.batch_size,
            batch_format="numpy", num_cpus=cfg.embed.num_cpus_per_actor, num_gpus=cfg.embed.num_gpus_per_actor)
    )
    counts = stage_and_commit(staged, lake, "embed", with_reject_reason(schema), "embeddings", ["image_id", "kind"], schema)
    summary.written, summary.rejected = counts["written"] // 2, counts["rejected"]
    summary.extra["vectors"] = counts["written"]
    summary.skipped = summary.read - summary.written - summary.rejected
    return summary
