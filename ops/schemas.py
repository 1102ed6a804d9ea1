"""The data contracts: the Arrow schema of every table the stages write (docs/stages.md)."""
from __future__ import annotations

import pyarrow as pa

# An edit-triplets table in HQ-Edit form (catalogue.triplets): the columns it must have.
TRIPLET_COLUMNS = ("triplet_id", "source_uri", "instruction", "target_uri", "target_description")

# Rows an op could not process carry a reason here; the stage routes them to `rejects`.
REJECT_REASON = pa.field("reject_reason", pa.string())

IMAGES = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    # The manifest's own caption (alt-text), when it has one: the mixed-length
    # strategy's short caption (fusion-diff section 6.1).
    pa.field("source_caption", pa.string()),
    # What the store said of the file when its bytes were read: "etag:<ETag>" (from the
    # manifest's etag column) or "size:<bytes>;mtime_ns:<ns>" (a stat / HEAD). A night
    # that finds the same stamp for the same uri skips the image without reading it.
    # Null: the store gave neither, so the image is hashed every night. Last, so that a
    # lake written before it existed gains it as an all-null column (Lake.add_missing_columns).
    pa.field("stamp", pa.string()),
])

CAPTIONS = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("sha256", pa.string()),  # of the image bytes that were captioned
    pa.field("caption_long", pa.string()),
    pa.field("caption_short", pa.string()),
    pa.field("caption_short_source", pa.string()),  # "manifest" or "model"
    pa.field("model", pa.string()),
])

EMBEDDING_KINDS = ("image", "pair")
# The gallery: the image vectors of `embeddings`.
GALLERY = "kind = 'image'"


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # "image": f_M(I); "pair": f_M(I, T)
        pa.field("sha256", pa.string()),
        pa.field("model", pa.string()),
        pa.field("text", pa.string()),  # the caption fused into a pair; null for kind image
        pa.field("caption_kind", pa.string()),  # "long" or "short" for pairs
        pa.field("vector", pa.list_(pa.float32(), dim)),
    ])


REJECTS = pa.schema([
    pa.field("stage", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("run_at", pa.timestamp("us", tz="UTC")),
])


def with_reject_reason(schema: pa.Schema) -> pa.Schema:
    return schema.append(REJECT_REASON)


def vector_dim(schema: pa.Schema, column: str = "vector") -> int | None:
    t = schema.field(column).type if column in schema.names else None
    return t.list_size if t is not None and pa.types.is_fixed_size_list(t) else None


def _vector(name: str, dim: int) -> pa.Field:
    return pa.field(name, pa.list_(pa.float32(), dim))


# Text conditions stored flattened (ops/conditions.py); null when the training worker
# encodes the text itself (train.text_conditions: worker).
COND_COLUMNS = [pa.field("text_encoder", pa.string()), pa.field("cond_tokens", pa.list_(pa.float32())),
                pa.field("cond_len", pa.int32())]


def stage1_examples_schema(dim: int) -> pa.Schema:
    """`stage1_examples` (image_id): Stage 1 pairs with their precomputed text condition."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("text", pa.string()),
        _vector("vector", dim),
        *COND_COLUMNS,
    ])


def triplet_embeddings_schema(dim: int) -> pa.Schema:
    """`triplet_embeddings` (triplet_id): Stage 2's inputs, z_{r,Delta} = f_M(I_r, T_Delta)
    and z_t = f_M(I_t, T_t), with the condition text (and its tokens when precomputed,
    and the describer when it wrote the text)."""
    return pa.schema([
        pa.field("triplet_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string()),
        pa.field("target_uri", pa.string()),
        pa.field("source_sha256", pa.string()),
        pa.field("target_sha256", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("target_description", pa.string()),
        pa.field("cond_text", pa.string()),
        pa.field("model", pa.string()),
        _vector("z_query", dim),
        _vector("z_target", dim),
        *COND_COLUMNS,
        # The describer that wrote cond_text (train_stage2.condition_text: described), else
        # null; last, so that a lake from before it gains it as a null column.
        pa.field("describer", pa.string()),
    ])


def query_vectors_schema(width: int) -> pa.Schema:
    """`query_vectors` (query_id, mode): the rank stage's cache of query vectors, reused
    while `query_key` (inputs, models, checkpoints, settings) is unchanged. width is
    samples x d_VL (samples > 1 only with sampling.aggregation: none)."""
    return pa.schema([
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("query_key", pa.string()),
        pa.field("reference_id", pa.string()),
        pa.field("reference_uri", pa.string()),
        pa.field("reference_sha256", pa.string()),
        pa.field("modification_text", pa.string()),
        pa.field("shared_concept", pa.string()),
        pa.field("description", pa.string()),
        _vector("vector", width),
    ])


RANKINGS = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("run_date", pa.string()),
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),  # 1-based
    pa.field("image_id", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("description", pa.string()),  # T~, the generated target description
    pa.field("mode", pa.string()),
    # What produced the row: checkpoint digests (sha256 of the safetensors, 16 hex),
    # the embedder, and a digest of the settings that shape a ranking.
    pa.field("prior_version", pa.string()),
    pa.field("adapter_version", pa.string()),
    pa.field("embedder", pa.string()),
    pa.field("config_hash", pa.string()),
])
