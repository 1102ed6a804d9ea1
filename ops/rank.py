"""Composed queries -> query vectors, in each run mode of the rank stage.

| mode | query vector |
|---|---|
| full | Fusion-Diff: z_t sampled from the prior + Control-Adapter given c(T~) and z_{r,Delta} |
| query_only | z_{r,Delta} = f_M(I_r, T_Delta) (Table 3, A) |
| prior_only | z_t sampled from the Stage 1 prior given c(T~) alone (Table 3, B) |
| joint | MVFT-JI: w z_{r,Delta} + (1 - w) f_M(T~); its inner product with a unit gallery vector is w cos(z_q, z_g) + (1 - w) cos(z(T~), z_g) |
| text | a text-only query T (TIGeR): sampled from the prior given c(T), or f_M(T) |

T~ is the describer's description of the target, written from the reference image and
the modification with the paper's template (section 6.3), which names the shared
concept when the query has one. Each op loads only the models its mode needs.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import torch

from model.checkpoints import load_adapter, load_prior
from model.diffusion import DiffusionConfig, GuidedSampler, SamplerConfig
from model.mllm import Captioner, FusedEmbedder, load_mllm_from_conf
from model.text_encoder import load_text_encoder_from_conf
from ops.images import ImageRejected, load_image

MODES = ("full", "query_only", "prior_only", "joint", "text")
TEXT_QUERIES = ("prior", "embedding")


class RankError(ValueError):
    pass


def needs(mode: str, text_query: str) -> set[str]:
    """The models a mode uses: describer, embedder, text_encoder, prior, adapter."""
    return {
        "full": {"describer", "embedder", "text_encoder", "prior", "adapter"},
        "query_only": {"embedder"},
        "prior_only": {"describer", "text_encoder", "prior"},
        "joint": {"describer", "embedder"},
        "text": {"text_encoder", "prior"} if text_query == "prior" else {"embedder"},
    }[mode]


def describe_prompt(template: str, template_no_concept: str, modification: str, concept: str | None) -> str:
    if concept:
        return template.format(modification=modification, shared_concept=concept)
    return template_no_concept.format(modification=modification)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def query_key(row: dict, versions: dict) -> str:
    """What a query's vector depends on: its inputs (the reference's bytes, not its uri) and
    every model, checkpoint and setting of the mode. Equal keys give equal vectors."""
    inputs = {k: row.get(k) for k in ("reference_sha256", "modification_text", "shared_concept")}
    return hashlib.sha256(json.dumps([inputs, versions], sort_keys=True).encode()).hexdigest()


class QueryOp:
    """Loads the mode's models once (per Ray actor); turns a batch of resolved queries
    into query vectors (B, S x d) and descriptions; rows it cannot use get a reject_reason."""

    def __init__(self, models: dict, rank: dict, diffusion: dict, sampling: dict, prior_path: str | None,
                 adapter_path: str | None, expected_prior: dict, s3: dict | None, seed: int, schema: pa.Schema):
        self.mode, self.rank, self.s3, self.seed, self.schema = rank["mode"], rank, s3, seed, schema
        use = needs(self.mode, rank["text_query"])
        self.describer = Captioner(load_mllm_from_conf(models["describer"])) if "describer" in use else None
        emb = models["embedder"]
        self.embedder = FusedEmbedder.from_conf(emb) if "embedder" in use else None
        self.encoder = load_text_encoder_from_conf(models["text_encoder"], emb) if "text_encoder" in use else None
        self.prior = self.adapter = None
        device = torch.device(rank["device"])
        if "prior" in use:
            self.prior = load_prior(prior_path, expected=expected_prior).to(device).eval()
        if "adapter" in use:
            self.adapter = load_adapter(adapter_path, self.prior).to(device).eval()
        self.sampler = GuidedSampler(DiffusionConfig(**diffusion), SamplerConfig(**sampling))
        self.samples = sampling["samples_per_query"] if sampling["aggregation"] == "none" else 1
        self.dim = emb["dim"]

    def _describe(self, images, rows) -> list[str]:
        r = self.rank
        prompts = [describe_prompt(r["describe_template"], r["describe_template_no_concept"],
                                   row["modification_text"], row.get("shared_concept")) for row in rows]
        return self.describer.generate(images, prompts, r["describe_max_new_tokens"])

    def _sample(self, texts: list[str], z_query: torch.Tensor | None, key: str) -> torch.Tensor:
        c, m = self.encoder.encode(texts)
        device = self.prior.device
        g = torch.Generator(device=device).manual_seed(self.seed + int(key[:8], 16))
        zq = None if z_query is None else z_query.to(device)
        z = self.sampler.sample(self.prior, c.to(device, self.prior.dtype), m.to(device), self.adapter, zq,
                                generator=g)
        return z.float().cpu()

    def vectors(self, images: list, rows: list[dict]) -> tuple[torch.Tensor, list[str | None]]:
        """(B, S, d) query vectors and the descriptions (None where the mode writes none)."""
        key = rows[0]["query_key"]
        mode, texts = self.mode, [r["modification_text"] for r in rows]
        if mode == "text":
            if self.prior is not None:
                return self._sample(texts, None, key).view(len(rows), -1, self.dim), texts
            return self.embedder.embed(texts=texts).unsqueeze(1), texts
        zq = self.embedder.embed(images=images, texts=texts) if mode in ("full", "query_only", "joint") else None
        if mode == "query_only":
            return zq.unsqueeze(1), [None] * len(rows)
        desc = self._describe(images, rows)
        if mode == "joint":
            w = self.rank["joint_weight"]
            zt = self.embedder.embed(texts=desc)
            return (w * zq + (1 - w) * zt).unsqueeze(1), desc
        z = self._sample(desc, zq if mode == "full" else None, key)
        return z.view(len(rows), -1, self.dim), desc

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        images, ok = [], []
        for i, r in enumerate(rows):
            if r.get("reject_reason"):
                continue
            if self.mode != "text":
                try:
                    images.append(load_image(r["reference_uri"], self.s3, expected_sha256=r["reference_sha256"]))
                except ImageRejected as e:
                    r["reject_reason"] = f"reference image: {e}"
                    continue
            ok.append(i)
        n, width = len(rows), self.samples * self.dim
        vectors = np.zeros((n, width), np.float32)
        descriptions: list[str | None] = [None] * n
        if ok:
            v, desc = self.vectors(images, [rows[i] for i in ok])
            vectors[ok] = v.reshape(len(ok), -1).numpy()
            for j, i in enumerate(ok):
                descriptions[i] = desc[j]
        valid = np.array([not r.get("reject_reason") for r in rows])
        cols = {name: pa.array([r.get(name) for r in rows], self.schema.field(name).type)
                for name in self.schema.names if name not in ("vector", "description", "mode")}
        cols["mode"] = pa.array([self.mode] * n, pa.string())
        cols["description"] = pa.array(descriptions, pa.string())
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), width,
                                                           mask=pa.array(~valid))
        return pa.table(cols).select(self.schema.names).cast(self.schema)
