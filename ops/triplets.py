"""Stage 2's pre-stage ops: edit triplets (HQ-Edit form) -> z_{r,Delta}, z_t and the condition.

`hash_triplets` reads both images' bytes, so that unchanged triplets are skipped before
any model runs (their bytes are read again by the embedding op: cheap beside f_M);
`TripletEmbedOp` computes z_{r,Delta} = f_M(I_r, T_Delta) and z_t = f_M(I_t, T_t)
(fusion-diff section 3.3), the condition text when the describer writes it, and the
condition's tokens when they are precomputed.
"""
from __future__ import annotations

import pyarrow as pa

from model.mllm import Captioner, FusedEmbedder, embedder_id, load_mllm_from_conf
from model.text_encoder import load_text_encoder_from_conf, text_encoder_name
from ops.base import ImageRowsOp
from ops.conditions import conditions_to_arrow
from ops.images import ImageLimits, ImageRejected, probe_image, sha256_hex
from ops.rank import describe_targets, describer_id
from ops.schemas import triplet_embeddings_schema, with_reject_reason
from ops.storage import read_bytes
from ops.tables import TableReader

# train_stage2.condition_text: a manifest column, or DESCRIBED: the describer's T~ of the
# triplet's (source image, instruction), written as rank writes a query's.
CONDITION_TEXTS = {"instruction": "instruction", "description": "target_description"}
DESCRIBED = "described"


def staged_schema(dim: int) -> pa.Schema:
    # `uri` names the failing image in `rejects`.
    return with_reject_reason(triplet_embeddings_schema(dim)).append(pa.field("uri", pa.string()))


def hash_triplets(batch: pa.Table, tables: TableReader | None, limits: dict, condition_text: str) -> pa.Table:
    """Adds source_sha256, target_sha256, cond_text, and reject_reason/uri for unreadable images."""
    lim, s3 = ImageLimits.from_conf(limits), (tables.s3 if tables is not None else None)
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
    if condition_text == DESCRIBED:  # written by TripletEmbedOp's describer
        return batch.append_column("cond_text", pa.nulls(batch.num_rows, pa.string()))
    return batch.append_column("cond_text", batch.column(CONDITION_TEXTS[condition_text]))


class TripletEmbedOp(ImageRowsOp):
    """Loads f_M once per Ray actor, and the describer when it writes the condition text
    and the text encoder when conditions are precomputed."""

    image_columns = (("source_uri", "source_sha256"), ("target_uri", "target_sha256"))

    def __init__(self, conf: dict, tables: TableReader | None):
        super().__init__(tables, conf["images"]["alpha_background"])
        model, te = conf["models"]["embedder"], conf["models"]["text_encoder"]
        self.embedder = FusedEmbedder.from_conf(model)
        self.model_name = embedder_id(model)
        self.encoder, self.encoder_name = None, None
        if conf["train"]["text_conditions"] == "precomputed":
            self.encoder = load_text_encoder_from_conf(te, model)
            self.encoder_name = text_encoder_name(te, model)
        self.describer, self.describer_name, self.rank = None, None, conf["rank"]
        if conf["train_stage2"]["condition_text"] == DESCRIBED:
            self.describer = Captioner(load_mllm_from_conf(conf["models"]["describer"]))
            self.describer_name = describer_id(conf["models"]["describer"], conf["rank"])
        self.schema = staged_schema(model["dim"])

    def _row(self, row: dict) -> dict:
        return {
            k: row.get(k)
            for k in self.schema.names
            if k not in ("z_query", "z_target", "cond_tokens", "cond_len")
        } | {"model": self.model_name, "text_encoder": self.encoder_name, "describer": self.describer_name}

    def rejected(self, row: dict) -> list[dict]:
        return [self._row(row)]

    def compute(self, rows: list[dict], images: list[tuple]) -> list[dict]:
        if self.describer is not None:
            # Triplets carry no shared concept: the no-concept template, as for such a query.
            texts = describe_targets(self.describer, self.rank, [im[0] for im in images],
                                     [r["instruction"] for r in rows], [None] * len(rows))
            rows = [r | {"cond_text": t} for r, t in zip(rows, texts)]
        zq = self.embedder.embed(
            images=[im[0] for im in images], texts=[r["instruction"] for r in rows], side="query"
        ).numpy()
        zt = self.embedder.embed(
            images=[im[1] for im in images], texts=[r["target_description"] for r in rows]
        ).numpy()
        out = [self._row(r) | {"z_query": q, "z_target": t} for r, q, t in zip(rows, zq, zt)]
        if self.encoder is not None:
            tokens, mask = self.encoder.encode([r["cond_text"] for r in rows])
            flat, lens = conditions_to_arrow(tokens, mask)
            for o, f, n in zip(out, flat.to_pylist(), lens.to_pylist()):
                o["cond_tokens"], o["cond_len"] = f, n
        return out
