"""The rows `finetune_embedder` trains on (MVFT-JI's two tasks), as per-batch functions."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ops.tables import TableReader
from ops.triplets import hash_triplets

CAPTION_COLUMNS = ("caption_long", "caption_short")
# What a text-to-image row carries to the training workers.
TEXT_TO_IMAGE_COLUMNS = ["image_uri", "image_sha256", "text"]
# What a target-text row carries (hash_triplets' good rows).
TARGET_TEXT_COLUMNS = ["source_uri", "source_sha256", "instruction", "target_description"]


def text_to_image_rows(batch: pa.Table, tables: TableReader, caption_column: str) -> pa.Table:
    """`captions` rows -> (image_uri, image_sha256, text): each image whose caption is of
    its current bytes in `images` (a caption of older bytes waits for `caption`), with a
    non-empty caption in `caption_column`."""
    ids = batch.column("image_id").to_pylist()
    images = tables.lookup("images", ids, ["uri", "sha256"])
    out = {c: [] for c in TEXT_TO_IMAGE_COLUMNS}
    for image_id, sha, text in zip(ids, batch.column("sha256").to_pylist(),
                                   batch.column(caption_column).to_pylist()):
        im = images.get(image_id)
        if im is None or im["sha256"] != sha or not text:
            continue
        out["image_uri"].append(im["uri"])
        out["image_sha256"].append(sha)
        out["text"].append(text)
    return pa.table({c: pa.array(v, pa.string()) for c, v in out.items()})


def target_text_rows(batch: pa.Table, tables: TableReader, limits: dict) -> pa.Table:
    """Triplets manifest rows -> TARGET_TEXT_COLUMNS of those whose images are readable
    (hash_triplets' checks; the `triplets` stage records the others in `rejects`)."""
    hashed = hash_triplets(batch, tables, limits, condition_text="instruction")
    return hashed.filter(pc.is_null(hashed.column("reject_reason"))).select(TARGET_TEXT_COLUMNS)
