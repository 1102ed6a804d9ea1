"""Embed: `images` + `captions` rows -> `embeddings` rows of kind image and pair."""
from __future__ import annotations

import hashlib

import pyarrow as pa

from model.mllm import FusedEmbedder, embedder_id
from ops.base import EmbeddingSizeError, ImageRowsOp
from ops.schemas import embeddings_schema, with_reject_reason
from ops.tables import TableReader

__all__ = ["EmbedOp", "EmbeddingSizeError", "attach_captions", "uses_short_caption", "check_embedder_dim"]


def uses_short_caption(image_id: str, short_fraction: float) -> bool:
    """The mixed-length strategy's draw for one image, stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    return h / 2**64 < short_fraction


def attach_captions(batch: pa.Table, tables: TableReader, short_fraction: float) -> pa.Table:
    """Adds each image's Stage 1 text (pair_text): its long or short caption, by the
    mixed-length draw; images with no caption for their current bytes wait for one."""
    ids = batch.column("image_id").to_pylist()
    caps = tables.lookup("captions", ids, ["sha256", "caption_long", "caption_short"])
    keep, texts, kinds = [], [], []
    for image_id, sha in zip(ids, batch.column("sha256").to_pylist()):
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


def check_embedder_dim(name: str, found: int, expected: int) -> None:
    if found != expected:
        raise EmbeddingSizeError(f"embedder {name!r} gives vectors of size {found}, "
                                 f"but models.embedder.dim is {expected}: fix the config or the checkpoint")


class EmbedOp(ImageRowsOp):
    """Loads f_M once (per Ray actor); per image writes f_M(I) and f_M(I, T).

    T is the batch's `pair_text` (the caption the mixed-length draw picked, see
    `uses_short_caption`) and `pair_caption_kind` says which one it was.
    """

    def __init__(self, conf: dict, tables: TableReader | None):
        super().__init__(tables, conf["images"]["alpha_background"])
        model = conf["models"]["embedder"]
        self.embedder = FusedEmbedder.from_conf(model)
        check_embedder_dim(model["name_or_path"], self.embedder.dim, model["dim"])
        self.model_name = embedder_id(model)
        self.schema = with_reject_reason(embeddings_schema(model["dim"]))

    def _row(self, row: dict, kind: str) -> dict:
        return {"image_id": row["image_id"], "kind": kind, "sha256": row["sha256"], "model": self.model_name}

    def rejected(self, row: dict) -> list[dict]:
        return [self._row(row, "image") | {"reject_reason": row["reject_reason"]}]

    def compute(self, rows: list[dict], images: list[tuple]) -> list[dict]:
        first = [im[0] for im in images]
        texts = [r["pair_text"] for r in rows]
        # One call, each image through the vision tower once for f_M(I) and f_M(I, T).
        n = len(rows)
        keys = list(range(n))
        vectors = self.embedder.embed(images=first + first, texts=[None] * n + texts,
                                      image_keys=keys + keys).numpy()
        alone, paired = vectors[:n], vectors[n:]
        return [self._row(r, "image") | {"vector": v} for r, v in zip(rows, alone)] + [
            self._row(r, "pair")
            | {"vector": v, "text": r["pair_text"], "caption_kind": r["pair_caption_kind"]}
            for r, v in zip(rows, paired)
        ]
