"""The data contracts: the Arrow schema of every table the stages write (DESIGN.md)."""
from __future__ import annotations

import pyarrow as pa

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


def vector_dim(schema: pa.Schema) -> int | None:
    t = schema.field("vector").type if "vector" in schema.names else None
    return t.list_size if t is not None and pa.types.is_fixed_size_list(t) else None
