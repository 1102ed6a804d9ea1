"""Composed queries -> query vectors, in each run mode of the rank stage.

| mode | query vector |
|---|---|
| full | Fusion-Diff: z_t sampled from the prior + Control-Adapter given c(T~) and z_{r,Delta} |
| query_only | z_{r,Delta} = f_M(I_r, T_Delta) (Table 3, A) |
| prior_only | z_t sampled from the Stage 1 prior given c(T~) alone (Table 3, B) |
| joint | MVFT-JI: w z_{r,Delta} + (1 - w) f_M(T~); with a unit gallery vector z_g, the inner |
|       | product is w cos(z_q, z_g) + (1 - w) cos(z(T~), z_g) |
| text | a text-only query T (TIGeR): sampled from the prior given c(T), or f_M(T) |

T~ is the describer's description of the target, written from the reference image and
the modification with the paper's template (section 6.3), which names the shared
concept when the query has one. Each op loads only the models its mode needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import torch

from model.checkpoints import load_adapter, load_prior
from model.diffusion import DiffusionConfig, GuidedSampler, SamplerConfig
from model.errors import PipelineError
from model.mllm import Captioner, FusedEmbedder, load_mllm_from_conf
from model.text_encoder import load_text_encoder_from_conf
from ops.base import ImageRowsOp
from ops.images import sha256_hex
from ops.schemas import GALLERY, RANKINGS
from ops.search import RunningTopK, search_device
from ops.storage import filesystem, local_copy, read_bytes
from ops.tables import TableReader


class RankError(PipelineError):
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


def describe_targets(describer, rank: dict, images: list, modifications: list[str],
                     concepts: list[str | None]) -> list[str]:
    """T~ of each (reference image, edit): the describer's words with conf `rank`'s
    templates and length (fusion-diff section 6.3)."""
    prompts = [
        describe_prompt(rank["describe_template"], rank["describe_template_no_concept"], m, c)
        for m, c in zip(modifications, concepts)
    ]
    return describer.generate(images, prompts, rank["describe_max_new_tokens"])


def file_digest(uri: str, s3: dict | None) -> str:
    """sha256 (16 hex) of a file, local or s3://, read in 1 MiB pieces (checkpoints are GBs)."""
    fs, path = filesystem(uri, s3)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def query_inputs(row: dict) -> dict:
    """What a query is, whatever answers it: the reference's bytes (not its uri), the edit
    and the shared concept."""
    return {k: row.get(k) for k in ("reference_sha256", "modification_text", "shared_concept")}


def _json_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def query_key(row: dict, versions: dict) -> str:
    """What a query's vector depends on: its inputs and every model, checkpoint and setting
    of the mode. Equal keys give equal vectors."""
    return _json_digest([query_inputs(row), versions])


def noise_seed(row: dict, seed: int) -> int:
    """A query's sampling noise, from its inputs alone: the same draw whatever its batch, and
    whichever models and run folders answer it, so that two runs (a retrained prior, a clone
    in another folder) differ by their models, not by their noise."""
    return seed + int(_json_digest(query_inputs(row))[:8], 16)


def resolve(
    batch: pa.Table,
    tables: TableReader,
    mode: str,
    versions: dict,
    duplicate_ids: frozenset[str] = frozenset(),
) -> pa.Table:
    """Adds reference_uri / reference_sha256 from `images` (by reference_id) or from the
    reference_uri's bytes, the query's key, and a reject_reason for queries that cannot
    run (an id the queries table repeats, `duplicate_ids`, rejects every row of it)."""
    rows = batch.to_pylist()
    known = tables.lookup(
        "images", [r["reference_id"] for r in rows if r.get("reference_id")], ["uri", "sha256"]
    )
    out = []
    for r in rows:
        reason = None
        ref_uri, ref_sha = r.get("reference_uri"), None
        if not r.get("query_id"):
            reason = "empty query_id"
        elif r["query_id"] in duplicate_ids:
            reason = "duplicate query_id in the queries table"
        elif not r.get("modification_text"):
            reason = "empty modification_text"
        elif mode != "text":
            if r.get("reference_id"):
                hit = known.get(r["reference_id"])
                if hit is None:
                    reason = (
                        f"reference image {r['reference_id']!r} is not in the images table "
                        f"(missing or rejected at ingest)"
                    )
                else:
                    ref_uri, ref_sha = hit["uri"], hit["sha256"]
            elif ref_uri:
                try:
                    ref_sha = sha256_hex(read_bytes(ref_uri, tables.s3))
                except (FileNotFoundError, OSError) as e:
                    reason = f"reference image: cannot read {ref_uri}: {e}"
            else:
                reason = "no reference_id or reference_uri"
        row = {
            "query_id": r.get("query_id") or "",
            "mode": mode,
            "reference_id": r.get("reference_id"),
            "reference_uri": ref_uri,
            "reference_sha256": ref_sha,
            "modification_text": r.get("modification_text"),
            "shared_concept": r.get("shared_concept"),
            "reject_reason": reason,
            "uri": ref_uri,
        }
        row["query_key"] = query_key(row, versions)
        out.append(row)
    return pa.Table.from_pylist(out, schema=RESOLVED_SCHEMA)


RESOLVED_SCHEMA = pa.schema(
    [
        (k, pa.string())
        for k in (
            "query_id",
            "mode",
            "reference_id",
            "reference_uri",
            "reference_sha256",
            "modification_text",
            "shared_concept",
            "reject_reason",
            "uri",
            "query_key",
        )
    ]
)


def describer_id(describer: dict, rank: dict) -> str:
    """Who writes T~ (part of rank's query keys, and the `describer` column of
    `triplet_embeddings`): the describer's folder and a digest of what it sees and writes
    with (its pixel budget, the no-concept template, the length), so that a change of any
    re-describes."""
    seen = (describer.get("image_min_pixels"), describer.get("image_max_pixels"))
    settings = "|".join(str(x) for x in (*seen, rank["describe_template_no_concept"],
                                         rank["describe_max_new_tokens"]))
    return f"{describer['name_or_path']} ({hashlib.sha256(settings.encode()).hexdigest()[:12]})"


class QueryOp(ImageRowsOp):
    """Loads the mode's models once (per Ray actor); turns a batch of resolved queries
    into query vectors (B, S x d) and descriptions; rows it cannot use get a reject_reason.

    The prior and adapter are read from `checkpoints` (their URIs, local or s3://): each
    actor fetches its own copy, since on a cluster it runs on a node other than the
    driver's. Each query's sampling noise is seeded from its own inputs (`noise_seed`), so
    its vector is the same whichever queries share its batch (the cache promises: equal
    keys, equal vectors)."""

    image_columns = (("reference_uri", "reference_sha256"),)

    def __init__(self, conf: dict, tables: TableReader | None, checkpoints: dict, schema: pa.Schema):
        super().__init__(tables, conf["images"]["alpha_background"])
        models, rank, sampling = conf["models"], conf["rank"], conf["sampling"]
        self.mode, self.rank, self.seed, self.schema = rank["mode"], rank, conf["seed"], schema
        if self.mode == "text":
            self.image_columns = ()
        use = needs(self.mode, rank["text_query"])
        self.describer = Captioner(load_mllm_from_conf(models["describer"])) if "describer" in use else None
        emb = models["embedder"]
        self.embedder = FusedEmbedder.from_conf(emb) if "embedder" in use else None
        self.encoder = (
            load_text_encoder_from_conf(models["text_encoder"], emb) if "text_encoder" in use else None
        )
        self.prior = self.adapter = None
        device = torch.device(rank["device"])
        self._cache = tempfile.mkdtemp(prefix="cirpipe-checkpoints-")
        if "prior" in use:
            path = local_copy(checkpoints["prior"], self.s3, os.path.join(self._cache, "prior"))
            self.prior = load_prior(path, expected=checkpoints["expected_prior"]).to(device).eval()
        if "adapter" in use:
            path = local_copy(checkpoints["adapter"], self.s3, os.path.join(self._cache, "adapter"))
            self.adapter = load_adapter(path, self.prior).to(device).eval()
        self.sampler = GuidedSampler(DiffusionConfig(**conf["diffusion"]), SamplerConfig(**sampling))
        self.samples = sampling["samples_per_query"] if sampling["aggregation"] == "none" else 1
        self.dim = emb["dim"]

    def _describe(self, images, rows) -> list[str]:
        mods, concepts = [r["modification_text"] for r in rows], [r.get("shared_concept") for r in rows]
        return describe_targets(self.describer, self.rank, images, mods, concepts)

    def _sample(self, texts: list[str], z_query: torch.Tensor | None, rows: list[dict]) -> torch.Tensor:
        c, m = self.encoder.encode(texts)
        device = self.prior.device
        generators = [torch.Generator().manual_seed(noise_seed(r, self.seed)) for r in rows]
        zq = None if z_query is None else z_query.to(device)
        z = self.sampler.sample(
            self.prior, c.to(device, self.prior.dtype), m.to(device), self.adapter, zq, generator=generators
        )
        return z.float().cpu()

    def vectors(self, images: list, rows: list[dict]) -> tuple[torch.Tensor, list[str | None]]:
        """(B, S, d) query vectors and the descriptions (None where the mode writes none)."""
        mode, texts = self.mode, [r["modification_text"] for r in rows]
        if mode == "text":
            if self.prior is not None:
                return self._sample(texts, None, rows).view(len(rows), -1, self.dim), texts
            return self.embedder.embed(texts=texts, side="query").unsqueeze(1), texts
        zq = (
            self.embedder.embed(images=images, texts=texts, side="query")
            if mode in ("full", "query_only", "joint")
            else None
        )
        if mode == "query_only":
            return zq.unsqueeze(1), [None] * len(rows)
        desc = self._describe(images, rows)
        if mode == "joint":
            w = self.rank["joint_weight"]
            zt = self.embedder.embed(texts=desc, side="query")
            return (w * zq + (1 - w) * zt).unsqueeze(1), desc
        z = self._sample(desc, zq if mode == "full" else None, rows)
        return z.view(len(rows), -1, self.dim), desc

    def rejected(self, row: dict) -> list[dict]:
        return [row | {"mode": self.mode, "description": None, "vector": None}]

    def compute(self, rows: list[dict], images: list[tuple]) -> list[dict]:
        v, desc = self.vectors([im[0] for im in images] if self.image_columns else [], rows)
        flat = v.reshape(len(rows), -1).numpy()
        return [r | {"mode": self.mode, "description": d, "vector": x} for r, d, x in zip(rows, desc, flat)]


RESULT_SCHEMA = pa.schema(
    [RANKINGS.field(n) for n in ("query_id", "rank", "image_id", "score", "description")]
)


class GallerySearch:
    """Ranks a batch of resolved queries (by their cached vectors) against the gallery
    (`embeddings` of kind image): an exact scan in blocks with a running top-k, or the
    `index` stage's vector index; returns `rankings` rows without the run's columns."""

    def __init__(self, conf: dict, tables: TableReader, search: str):
        self.tables, self.search = tables, search
        self.mode, self.k = conf["rank"]["mode"], conf["rank"]["top_k"]
        self.block, self.exclude = conf["rank"]["gallery_block"], conf["rank"]["exclude_reference"]
        self.index, self.dim = conf["index"], conf["models"]["embedder"]["dim"]
        self.device = search_device(conf["rank"]["search_device"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [r for r in batch.to_pylist() if not r.get("reject_reason")]
        cached = self.tables.lookup(
            "query_vectors",
            [r["query_id"] for r in rows],
            ["query_key", "description", "vector"],
            key="query_id",
            where=f"mode = '{self.mode}'",
        )
        live = [
            (r, cached[r["query_id"]])
            for r in rows
            if r["query_id"] in cached and cached[r["query_id"]]["query_key"] == r["query_key"]
        ]
        out = {name: [] for name in RESULT_SCHEMA.names}
        if not live:
            return pa.table(out, schema=RESULT_SCHEMA)
        q = np.asarray([c["vector"] for _, c in live], np.float32).reshape(len(live), -1, self.dim)
        exclude = [r["reference_id"] if self.exclude else None for r, _ in live]
        ids, scores = self._exact(q, exclude) if self.search == "exact" else self._ann(q, exclude)
        for (r, c), qi, qs in zip(live, ids, scores):
            rank = 0
            for image_id, score in zip(qi, qs):
                if image_id is None or not np.isfinite(score):
                    continue
                rank += 1
                for k, v in (
                    ("query_id", r["query_id"]),
                    ("rank", rank),
                    ("image_id", image_id),
                    ("score", float(score)),
                    ("description", c["description"]),
                ):
                    out[k].append(v)
        return pa.table(out, schema=RESULT_SCHEMA)

    def _exact(self, q: np.ndarray, exclude: list) -> tuple[np.ndarray, np.ndarray]:
        topk = RunningTopK(q, self.k, exclude, self.device)
        for b in self.tables.scan(
            "embeddings", ["image_id", "vector"], filter=GALLERY, batch_size=self.block
        ):
            if b.num_rows:
                vec = b.column("vector").values.to_numpy(zero_copy_only=False).reshape(b.num_rows, -1)
                topk.add(b.column("image_id"), vec)
        return topk.result()

    def _ann(self, q: np.ndarray, exclude: list) -> tuple[list, list]:
        """Every sample vector of the batch searched in the index in one call (k + 1, so
        that the reference can go), a query's samples merged by their best score."""
        samples = q.shape[1]
        hits = self.tables.nearest(
            "embeddings", q.reshape(-1, self.dim), self.k + 1, GALLERY, self.index["nprobes"],
            self.index["refine_factor"],
        )
        ids_out, scores_out = [], []
        for i, ex in enumerate(exclude):
            best: dict[str, float] = {}
            for found in hits[i * samples:(i + 1) * samples]:
                for image_id, score in found:
                    if image_id != ex:
                        best[image_id] = max(best.get(image_id, -np.inf), score)
            top = sorted(best.items(), key=lambda kv: -kv[1])[: self.k]
            ids_out.append([t[0] for t in top])
            scores_out.append([t[1] for t in top])
        return ids_out, scores_out
