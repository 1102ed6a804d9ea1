"""Embed: `images` + `captions` rows -> `embeddings` rows of kind image and pair."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from model.mllm import FusedEmbedder
from ops.images import ImageRejected, load_image
from ops.schemas import embeddings_schema, with_reject_reason


class EmbeddingSizeError(ValueError):
    pass


def uses_short_caption(image_id: str, short_fraction: float) -> bool:
    """The mixed-length strategy's draw for one image, stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    return h / 2**64 < short_fraction


def vectors_to_arrow(vectors: np.ndarray, dim: int, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise EmbeddingSizeError(f"expected vectors of size {dim}, got an array of shape {vectors.shape}")
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim, mask=mask)


class EmbedOp:
    """Loads f_M once (per Ray actor); per image writes f_M(I) and f_M(I, T).

    T is the batch's `pair_text` (the caption the mixed-length draw picked, see
    `uses_short_caption`) and `pair_caption_kind` says which one it was.
    """

    def __init__(self, model: dict, s3: dict | None):
        self.embedder = FusedEmbedder.from_conf(model)
        if self.embedder.dim != model["dim"]:
            raise EmbeddingSizeError(
                f"embedder {model['name_or_path']!r} gives vectors of size {self.embedder.dim}, "
                f"but models.embedder.dim is {model['dim']}: fix the config or the checkpoint")
        self.dim = model["dim"]
        self.model_name = model["name_or_path"]
        self.s3 = s3
        self.schema = with_reject_reason(embeddings_schema(self.dim))

    def __call__(self, batch: dict) -> pa.Table:
        images, keep, rejected = [], [], []
        for i in range(len(batch["image_id"])):
            try:
                images.append(load_image(batch["uri"][i], self.s3, expected_sha256=batch["sha256"][i]))
                keep.append(i)
            except ImageRejected as e:
                rejected.append((i, str(e)))
        cols = {k: [] for k in self.schema.names if k != "vector"}
        vectors = np.zeros((2 * len(keep) + len(rejected), self.dim), np.float32)
        if keep:
            texts = [batch["pair_text"][i] for i in keep]
            vectors[: len(keep)] = self.embedder.embed(images=images).numpy()
            vectors[len(keep): 2 * len(keep)] = self.embedder.embed(images=images, texts=texts).numpy()
            for kind in ("image", "pair"):
                for j, i in enumerate(keep):
                    cols["image_id"].append(batch["image_id"][i])
                    cols["kind"].append(kind)
                    cols["sha256"].append(batch["sha256"][i])
                    cols["model"].append(self.model_name)
                    cols["text"].append(texts[j] if kind == "pair" else None)
                    cols["caption_kind"].append(batch["pair_caption_kind"][keep[j]] if kind == "pair" else None)
                    cols["reject_reason"].append(None)
        for i, reason in rejected:
            for k, v in (("image_id", batch["image_id"][i]), ("kind", "image"), ("sha256", batch["sha256"][i]),
                         ("model", self.model_name), ("text", None), ("caption_kind", None), ("reject_reason", reason)):
                cols[k].append(v)
        valid = np.array([r is None for r in cols["reject_reason"]], dtype=bool)
        arrays = {k: pa.array(v, type=self.schema.field(k).type) for k, v in cols.items()}
        arrays["vector"] = vectors_to_arrow(vectors, self.dim, valid)
        return pa.table(arrays).select(self.schema.names).cast(self.schema)
