"""Stage `rank`: composed queries -> the top-k gallery images of each, into the lake.

1. Query vectors (Ray Data, model actors): each query is resolved (its reference
   image's uri and bytes' sha256 from `images`, or from its own reference_uri) and
   keyed by everything its vector depends on (ops/rank.py `query_key`); only queries
   whose key changed reach the models; vectors are cached in `query_vectors`.
2. Search (Ray Data): for each batch of queries, an exact scan of the gallery
   (`embeddings` of kind image) in blocks with a running top-k, or the `index`
   stage's LanceDB index (rank.search: ann).
3. Publish: one Parquet object per run at rankings/run_date=<date>/<run_id>.parquet,
   written whole and then made visible (a local rename; on S3 a single PUT appears
   complete or not at all), and the Lance table `rankings` merged in one commit that
   also deletes the run's rows the new ranking lacks. A crashed run leaves no partial
   partition; rerunning a run_id replaces its rows.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from model.checkpoints import CheckpointMismatch
from model.text_encoder import text_encoder_dim
from ops.images import sha256_hex
from ops.rank import MODES, TEXT_QUERIES, QueryOp, RankError, file_digest, needs, query_key
from ops.schemas import RANKINGS, REJECT_REASON, query_vectors_schema, vector_dim
from ops.search import RunningTopK
from ops.storage import filesystem, is_s3, local_copy, read_bytes
from pipelines.common import init_ray, plain, prepare_models, stage_and_commit, write_staging
from pipelines.ingest import read_manifest
from pipelines.lake import Lake, TableError, lookup, open_dataset
from pipelines.stages import any_rows, keep_changed

QUERY_COLUMNS = ("query_id", "modification_text")
OPTIONAL_QUERY_COLUMNS = ("reference_id", "reference_uri", "shared_concept", "target_id")
GALLERY = "kind = 'image'"
SAFETENSORS = "diffusion_pytorch_model.safetensors"


@dataclass
class RankSummary:
    run_id: str
    read: int = 0
    computed: int = 0
    reused: int = 0
    rejected: int = 0
    ranked: int = 0
    rows: int = 0
    where: str = ""
    parquet: str = ""
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        return (f"[rank] run {self.run_id}: read {self.read} queries, vectors computed {self.computed}, "
                f"reused {self.reused}, rejected {self.rejected}; ranked {self.ranked}, {self.rows} rows "
                f"in {time.monotonic() - self.started:.1f}s; {self.where}")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _setting(cfg) -> tuple[str, str]:
    r = cfg.rank
    if r.mode not in MODES:
        raise RankError(f"rank.mode={r.mode!r}: expected one of {', '.join(MODES)}")
    if r.text_query not in TEXT_QUERIES:
        raise RankError(f"rank.text_query={r.text_query!r}: expected one of {', '.join(TEXT_QUERIES)}")
    if r.search not in ("exact", "ann"):
        raise RankError(f"rank.search={r.search!r}: expected 'exact' or 'ann'")
    return r.mode, r.text_query


def versions(cfg, use: set[str], prior_path: str | None, adapter_path: str | None) -> dict:
    """The models and settings a mode's vectors depend on (part of each query's key)."""
    m = cfg.models
    out = {"mode": cfg.rank.mode, "seed": cfg.seed}
    if "describer" in use:
        out.update(describer=m.describer.name_or_path, template=cfg.rank.describe_template,
                   template_nc=cfg.rank.describe_template_no_concept, tokens=cfg.rank.describe_max_new_tokens)
    if "embedder" in use:
        out.update(embedder=m.embedder.name_or_path, instruction=m.embedder.instruction)
    if "text_encoder" in use:
        out.update(text_encoder=[m.text_encoder.kind, m.text_encoder.name_or_path, m.text_encoder.max_tokens])
    if "prior" in use:
        out.update(prior=file_digest(os.path.join(prior_path, SAFETENSORS)), sampling=plain(cfg.sampling),
                   diffusion=plain(cfg.diffusion))
    if "adapter" in use:
        out["adapter"] = file_digest(os.path.join(adapter_path, SAFETENSORS))
    if cfg.rank.mode == "joint":
        out["joint_weight"] = cfg.rank.joint_weight
    if cfg.rank.mode == "text":
        out["text_query"] = cfg.rank.text_query
    return out


def resolve(batch: pa.Table, images_uri: str, storage_options: dict, s3: dict, mode: str, versions_: dict) -> pa.Table:
    """Adds reference_uri / reference_sha256 from `images` (by reference_id) or from the
    reference_uri's bytes, the query's key, and a reject_reason for queries that cannot run."""
    rows = batch.to_pylist()
    ids = [r.get("reference_id") for r in rows if r.get("reference_id")]
    known = lookup(open_dataset(images_uri, storage_options), ids, ["uri", "sha256"])
    out = []
    for r in rows:
        reason = None
        ref_uri, ref_sha = r.get("reference_uri"), None
        if not r.get("query_id"):
            reason = "empty query_id"
        elif not r.get("modification_text"):
            reason = "empty modification_text"
        elif mode != "text":
            if r.get("reference_id"):
                hit = known.get(r["reference_id"])
                if hit is None:
                    reason = f"reference image {r['reference_id']!r} is not in the images table (missing or rejected at ingest)"
                else:
                    ref_uri, ref_sha = hit["uri"], hit["sha256"]
            elif ref_uri:
                try:
                    ref_sha = sha256_hex(read_bytes(ref_uri, s3))
                except (FileNotFoundError, OSError) as e:
                    reason = f"reference image: cannot read {ref_uri}: {e}"
            else:
                reason = "no reference_id or reference_uri"
        row = {"query_id": r.get("query_id") or "", "mode": mode, "reference_id": r.get("reference_id"),
               "reference_uri": ref_uri, "reference_sha256": ref_sha, "modification_text": r.get("modification_text"),
               "shared_concept": r.get("shared_concept"), "reject_reason": reason, "uri": ref_uri}
        row["query_key"] = query_key(row, versions_)
        out.append(row)
    schema = pa.schema([(k, pa.string()) for k in out[0]]) if out else pa.schema([])
    return pa.Table.from_pylist(out, schema=schema)


class GallerySearch:
    """Ranks a batch of queries (their cached vectors) against the gallery: exact blocked
    scan or the LanceDB index; writes `rankings` rows (without the run's columns)."""

    def __init__(self, lake: Lake, mode: str, top_k: int, search: str, block: int, exclude_reference: bool,
                 index: dict, dim: int):
        self.lake, self.mode, self.k, self.search = lake, mode, top_k, search
        self.block, self.exclude, self.index, self.dim = block, exclude_reference, index, dim
        self.table = None
        if search == "ann":
            import lancedb

            self.table = lancedb.connect(lake.root, storage_options=lake.storage_options).open_table("embeddings")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [r for r in batch.to_pylist() if not r.get("reject_reason")]
        cached = lookup(open_dataset(self.lake.uri("query_vectors"), self.lake.storage_options),
                        [r["query_id"] for r in rows], ["query_key", "description", "vector"],
                        key="query_id", where=f"mode = '{self.mode}'")
        live = [(r, cached[r["query_id"]]) for r in rows
                if r["query_id"] in cached and cached[r["query_id"]]["query_key"] == r["query_key"]]
        out = {name: [] for name in ("query_id", "rank", "image_id", "score", "description")}
        if not live:
            return pa.table(out, schema=_result_schema())
        q = np.asarray([c["vector"] for _, c in live], np.float32).reshape(len(live), -1, self.dim)
        exclude = [r["reference_id"] if self.exclude else None for r, _ in live]
        ids, scores = self._exact(q, exclude) if self.search == "exact" else self._ann(q, exclude)
        for (r, c), qi, qs in zip(live, ids, scores):
            rank = 0
            for image_id, score in zip(qi, qs):
                if image_id is None or not np.isfinite(score):
                    continue
                rank += 1
                for k, v in (("query_id", r["query_id"]), ("rank", rank), ("image_id", image_id),
                             ("score", float(score)), ("description", c["description"])):
                    out[k].append(v)
        return pa.table(out, schema=_result_schema())

    def _exact(self, q: np.ndarray, exclude: list) -> tuple[np.ndarray, np.ndarray]:
        topk = RunningTopK(q, self.k, exclude)
        ds = lance.dataset(self.lake.uri("embeddings"), storage_options=self.lake.storage_options)
        for b in ds.to_batches(columns=["image_id", "vector"], filter=GALLERY, batch_size=self.block):
            if b.num_rows:
                vec = b.column("vector").values.to_numpy(zero_copy_only=False).reshape(b.num_rows, -1)
                topk.add(b.column("image_id").to_pylist(), vec)
        return topk.result()

    def _ann(self, q: np.ndarray, exclude: list) -> tuple[list, list]:
        """Each sample vector searched in the index (k + 1, so that the reference can go),
        a query's samples merged by their best score."""
        ids_out, scores_out = [], []
        for samples, ex in zip(q, exclude):
            best: dict[str, float] = {}
            for v in samples:
                hits = (self.table.search(v, vector_column_name="vector").metric("cosine")
                        .where(GALLERY, prefilter=True).nprobes(self.index["nprobes"])
                        .refine_factor(self.index["refine_factor"]).limit(self.k + 1)
                        .select(["image_id"]).to_arrow())
                for image_id, dist in zip(hits.column("image_id").to_pylist(), hits.column("_distance").to_pylist()):
                    if image_id != ex:
                        best[image_id] = max(best.get(image_id, -np.inf), 1.0 - dist)
            top = sorted(best.items(), key=lambda kv: -kv[1])[: self.k]
            ids_out.append([t[0] for t in top])
            scores_out.append([t[1] for t in top])
        return ids_out, scores_out


def _result_schema() -> pa.Schema:
    return pa.schema([RANKINGS.field(n) for n in ("query_id", "rank", "image_id", "score", "description")])


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _checkpoints(cfg, use: set[str], lake: Lake, cache: str, gallery_dim: int) -> tuple[str | None, str | None, dict]:
    """Local copies of the checkpoints the mode needs, checked against the gallery's and
    the text encoder's sizes before any query is sampled."""
    if "prior" not in use:
        return None, None, {}
    cond_dim = text_encoder_dim(plain(cfg.models.text_encoder), plain(cfg.models.embedder))
    prior_path = local_copy(cfg.train_stage1.output, lake.s3, cache)
    config_file = os.path.join(prior_path, "config.json")
    if not os.path.exists(config_file):
        raise CheckpointMismatch(f"no prior checkpoint at {cfg.train_stage1.output}: run train_stage1 first "
                                 f"(or point train_stage1.output at one)")
    with open(config_file) as f:
        found = json.load(f)
    if found.get("d_vl") != gallery_dim:
        raise CheckpointMismatch(f"the gallery's vectors have size {gallery_dim} but the prior at "
                                 f"{cfg.train_stage1.output} was trained on d_vl={found.get('d_vl')}: "
                                 f"they come from different embedders")
    adapter_path = local_copy(cfg.train_stage2.output, lake.s3, cache) if "adapter" in use else None
    if adapter_path and not os.path.exists(os.path.join(adapter_path, "config.json")):
        raise CheckpointMismatch(f"no Control-Adapter checkpoint at {cfg.train_stage2.output}: run train_stage2 first")
    return prior_path, adapter_path, {"d_vl": gallery_dim, "cond_dim": cond_dim}


def run(cfg, run_id: str | None = None) -> RankSummary:
    mode, text_query = _setting(cfg)
    run_id = run_id or cfg.rank.run_id or new_run_id()
    summary = RankSummary(run_id)
    init_ray(cfg)
    prepare_models(cfg)
    lake = Lake.from_conf(cfg)
    gallery = lake.open("embeddings")
    gallery_rows = 0 if gallery is None else gallery.count_rows(filter=GALLERY)
    if gallery_rows == 0:
        raise RankError(f"the gallery is empty: {lake.uri('embeddings')} has no vectors of kind image; run embed first")
    dim = cfg.models.embedder.dim
    if vector_dim(gallery.schema) != dim:
        raise TableError(f"the gallery's vectors have size {vector_dim(gallery.schema)} but models.embedder.dim "
                         f"is {dim}: refusing to rank")
    queries = read_manifest(cfg.catalogue.queries, lake.s3, required=QUERY_COLUMNS,
                            optional=OPTIONAL_QUERY_COLUMNS, what="queries")
    summary.read = queries.count()
    if summary.read == 0:
        raise RankError(f"the queries table {cfg.catalogue.queries} is empty: nothing to rank")
    if cfg.rank.search == "ann" and not _has_vector_index(gallery):
        print(f"[rank] no vector index on {lake.uri('embeddings')} (run `index`): searching exactly")
    search = cfg.rank.search if _has_vector_index(gallery) else "exact"
    use = needs(mode, text_query)
    samples = cfg.sampling.samples_per_query if ("prior" in use and cfg.sampling.aggregation == "none") else 1
    schema = query_vectors_schema(samples * dim)
    staged_schema = schema.append(REJECT_REASON).append(pa.field("uri", pa.string()))
    with tempfile.TemporaryDirectory() as cache:
        prior_path, adapter_path, expected = _checkpoints(cfg, use, lake, cache, vector_dim(gallery.schema))
        v = versions(cfg, use, prior_path, adapter_path)
        resolved = queries.map_batches(resolve, batch_format="pyarrow", fn_kwargs=dict(
            images_uri=lake.uri("images"), storage_options=lake.storage_options, s3=lake.s3, mode=mode, versions_=v))
        todo = resolved.map_batches(keep_changed, batch_format="pyarrow", fn_kwargs=dict(
            table_uri=lake.uri("query_vectors"), storage_options=lake.storage_options, key="query_id",
            compare={"query_key": "query_key"}, where=f"mode = '{mode}'"))
        staged = None if not any_rows(todo) else (
            todo.map_batches(
                QueryOp, fn_constructor_kwargs=dict(
                    models=plain(cfg.models), rank=plain(cfg.rank), diffusion=plain(cfg.diffusion),
                    sampling=plain(cfg.sampling), prior_path=prior_path, adapter_path=adapter_path,
                    expected_prior=expected, s3=lake.s3, seed=cfg.seed, schema=staged_schema),
                compute=ray.data.ActorPoolStrategy(size=cfg.rank.num_actors), batch_size=cfg.rank.batch_size,
                batch_format="pyarrow", num_cpus=cfg.rank.num_cpus_per_actor, num_gpus=cfg.rank.num_gpus_per_actor)
        )
        counts = {"written": 0, "rejected": 0} if staged is None else stage_and_commit(
            staged, lake, "rank", staged_schema, "query_vectors", ["query_id", "mode"], schema, reject_key="query_id")
    summary.computed, summary.rejected = counts["written"], counts["rejected"]
    summary.reused = summary.read - summary.computed - summary.rejected
    results = resolved.map_batches(
        GallerySearch, fn_constructor_kwargs=dict(
            lake=lake, mode=mode, top_k=cfg.rank.top_k, search=search, block=cfg.rank.gallery_block,
            exclude_reference=cfg.rank.exclude_reference, index=plain(cfg.index), dim=dim),
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=cfg.rank.search_batch_size, batch_format="pyarrow")
    run_date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    provenance = {"run_id": run_id, "run_date": run_date, "mode": mode,
                  "prior_version": v.get("prior"), "adapter_version": v.get("adapter"),
                  "embedder": cfg.models.embedder.name_or_path,
                  "config_hash": _digest({**v, "rank": {k: x for k, x in plain(cfg.rank).items() if k != "run_id"},
                                          "index": plain(cfg.index) if search == "ann" else None})}
    write_staging(results, lake, "rank_results", _result_schema())
    staged_results = open_dataset(lake.staging_uri("rank_results"), lake.storage_options)
    summary.rows = 0 if staged_results is None else staged_results.count_rows()
    if summary.rows == 0:
        lake.clear_staging("rank_results")
        raise RankError(f"no query could be ranked ({summary.rejected} rejected: see the rejects table); "
                        f"nothing was written for run {run_id}")
    summary.ranked = len(set(staged_results.to_table(columns=["query_id"]).column("query_id").to_pylist()))
    summary.where = publish(lake, staged_results, provenance)
    summary.parquet = rankings_parquet_uri(lake, run_date, run_id)
    lake.clear_staging("rank_results")
    return summary


def _has_vector_index(ds) -> bool:
    return any("vector" in idx.field_names and idx.index_type.upper().startswith("IVF")
               for idx in ds.describe_indices())


def _with_provenance(reader, provenance: dict):
    for b in reader:
        n = b.num_rows
        cols = {name: (b.column(name) if name in b.schema.names else pa.array([provenance[name]] * n, RANKINGS.field(name).type))
                for name in RANKINGS.names}
        yield pa.record_batch([cols[n_].cast(RANKINGS.field(n_).type) for n_ in RANKINGS.names], schema=RANKINGS)


def rankings_parquet_uri(lake: Lake, run_date: str, run_id: str) -> str:
    return f"{lake.root}/rankings/run_date={run_date}/{run_id}.parquet"


def publish(lake: Lake, staged, provenance: dict) -> str:
    """The run's rows to Parquet (one object, made visible whole) and to `rankings.lance`
    (one commit that upserts them and deletes the run's rows they do not hold)."""
    run_id = provenance["run_id"]
    uri = rankings_parquet_uri(lake, provenance["run_date"], run_id)
    fs, path = filesystem(uri, lake.s3)
    # The same run_id written on an earlier day: its old partition's file goes.
    base_fs, base = filesystem(f"{lake.root}/rankings", lake.s3)
    from pyarrow.fs import FileSelector

    for info in base_fs.get_file_info(FileSelector(base, allow_not_found=True, recursive=True)):
        if info.base_name == f"{run_id}.parquet" and info.path.rstrip("/") != path.rstrip("/"):
            base_fs.delete_file(info.path)
    if is_s3(uri):
        with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, RANKINGS) as w:
            for b in _with_provenance(staged.to_batches(), provenance):
                w.write_batch(b)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/.{run_id}.parquet.tmp"
        with pq.ParquetWriter(tmp, RANKINGS) as w:
            for b in _with_provenance(staged.to_batches(), provenance):
                w.write_batch(b)
        os.replace(tmp, path)
    source = pa.RecordBatchReader.from_batches(RANKINGS, _with_provenance(staged.to_batches(), provenance))
    table = lake.open("rankings")
    if table is None:
        lance.write_dataset(source, lake.uri("rankings"), schema=RANKINGS, storage_options=lake.storage_options)
    else:
        (table.merge_insert(["run_id", "query_id", "rank"]).when_matched_update_all().when_not_matched_insert_all()
         .when_not_matched_by_source_delete(f"run_id = '{run_id}'").execute(source))
    return f"rankings at {uri} and {lake.uri('rankings')}"
