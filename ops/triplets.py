"""Stage 2's pre-stage ops: edit triplets (HQ-Edit form) -> z_{r,Delta}, z_t and the condition.

`hash_triplets` reads both images' bytes, so that unchanged triplets are skipped before
any model runs (their bytes are read again by the embedding op: cheap beside f_M);
`TripletEmbedOp` computes z_{r,Delta} = f_M(I_r, T_Delta) and z_t = f_M(I_t, T_t)
(fusion-diff section 3.3), and the text condition's tokens when they are precomputed.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from model.mllm import FusedEmbedder
from ops.conditions import conditions_to_arrow
from ops.embed import vectors_to_arrow
from ops.images import ImageLimits, ImageRejected, load_image, probe_image, sha256_hex
from ops.schemas import triplet_embeddings_schema, with_reject_reason
from ops.storage import read_bytes

TRIPLET_COLUMNS = ["triplet_id", "source_uri", "instruction", "target_uri", "target_description"]
CONDITION_TEXTS = {"instruction": "instruction", "description": "target_description"}


def staged_schema(dim: int) -> pa.Schema:
    # `uri` names the failing image in `rejects`.
    return with_reject_reason(triplet_embeddings_schema(dim)).append(pa.field("uri", pa.string()))


def hash_triplets(batch: pa.Table, s3: dict | None, limits: dict, condition_text: str) -> pa.Table:
    """Adds source_sha256, target_sha256, cond_text, and reject_reason/uri for unreadable images."""
    lim = ImageLimits.from_conf(limits)
    cols = {"source_sha256": [], "target_sha256": [], "reject_reason": [], "uri": []}
    for src, tgt in zip(batch.column("source_uri").to_pylist(), batch.column("target_uri").to_pylist()):
        shas, reason, bad_uri = [], None, None
        for uri in (src, tgt):
            try:
                data = read_bytes(uri, s3)
                probe_image(data, lim)
                shas.append(sha256_hex(data))
            except (FileNotFoundError, OSError) as e:
                reason, bad_uri = f"cannot read {uri}: {e}", uri
            except ImageRejected as e:
                reason, bad_uri = f"{uri}: {e}", uri
            if reason:
                break
        shas += [None] * (2 - len(shas))
        for k, v in zip(cols, (*shas, reason, bad_uri)):
            cols[k].append(v)
    for k, v in cols.items():
        batch = batch.append_column(k, pa.array(v, pa.string()))
    return batch.append_column("cond_text", batch.column(CONDITION_TEXTS[condition_text]))


class TripletEmbedOp:
    """Loads f_M once (and the text encoder when conditions are precomputed) per Ray actor."""

    def __init__(self, model: dict, s3: dict | None, text_encoder: dict | None = None):
        self.embedder = FusedEmbedder.from_conf(model)
        self.dim, self.model_name, self.s3 = model["dim"], model["name_or_path"], s3
        self.encoder = None
        if text_encoder is not None:
            from model.text_encoder import load_text_encoder_from_conf

            self.encoder = load_text_encoder_from_conf(text_encoder, model)
            self.encoder_name = text_encoder["name_or_path"] if text_encoder["kind"] == "t5" else model["name_or_path"]
        self.schema = staged_schema(self.dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        sources, targets, ok = [], [], []
        for i, r in enumerate(rows):
            if r["reject_reason"] is not None:
                continue
            try:
                s = load_image(r["source_uri"], self.s3, expected_sha256=r["source_sha256"])
                t = load_image(r["target_uri"], self.s3, expected_sha256=r["target_sha256"])
            except ImageRejected as e:
                r["reject_reason"] = str(e)
                continue
            sources.append(s)
            targets.append(t)
            ok.append(i)
        n, d = len(rows), self.dim
        zq, zt = np.zeros((n, d), np.float32), np.zeros((n, d), np.float32)
        cond_tokens, cond_len = pa.nulls(n, pa.list_(pa.float32())), pa.nulls(n, pa.int32())
        if ok:
            zq[ok] = self.embedder.embed(images=sources, texts=[rows[i]["instruction"] for i in ok]).numpy()
            zt[ok] = self.embedder.embed(images=targets, texts=[rows[i]["target_description"] for i in ok]).numpy()
            if self.encoder is not None:
                tokens, mask = self.encoder.encode([rows[i]["cond_text"] for i in ok])
                flat, lens = conditions_to_arrow(tokens, mask)
                pos = {i: j for j, i in enumerate(ok)}
                cond_tokens = pa.array([flat[pos[i]].as_py() if i in pos else None for i in range(n)],
                                       pa.list_(pa.float32()))
                cond_len = pa.array([lens[pos[i]].as_py() if i in pos else None for i in range(n)], pa.int32())
        valid = np.array([r["reject_reason"] is None for r in rows], dtype=bool)
        cols = {k: pa.array([r.get(k) for r in rows], self.schema.field(k).type)
                for k in self.schema.names if k not in ("z_query", "z_target", "cond_tokens", "cond_len",
                                                          "model", "text_encoder")}
        cols["model"] = pa.array([self.model_name] * n, pa.string())
        cols["text_encoder"] = pa.array([self.encoder_name if self.encoder else None] * n, pa.string())
        cols["z_query"] = vectors_to_arrow(zq, d, valid)
        cols["z_target"] = vectors_to_arrow(zt, d, valid)
        cols["cond_tokens"], cols["cond_len"] = cond_tokens, cond_len
        return pa.table(cols).select(self.schema.names).cast(self.schema)
