"""Stage `rank`: composed queries -> the top-k gallery images of each, into the lake.

Read top to bottom, `run` does three things:

1. `query_vectors`: each query is resolved once (its reference image's uri and bytes'
   sha256 from `images`, or from its own reference_uri) and keyed by everything its
   vector depends on (ops/rank.py `query_key`); only queries whose key changed reach
   the model actors; vectors are cached in `query_vectors`.
2. `search`: for each batch of queries, an exact scan of the gallery (`embeddings` of
   kind image) in blocks with a running top-k, or the `index` stage's vector index
   (rank.search: ann).
3. `publish`: one Parquet object per run at rankings/run_date=<date>/<run_id>.parquet,
   written whole and then made visible (a local rename; on S3 a single PUT appears
   complete or not at all), and the Lance table `rankings` merged in one commit that
   also deletes the run's rows the new ranking lacks. A crashed run leaves no partial
   partition; rerunning a run_id replaces its rows.

Between 1 and 2: when everything a ranking depends on (the queries and their keys, the
embeddings and query_vectors table versions, the settings) is what the last published
run had (rankings/_latest.json), step 2 is skipped and that run's rows are published
under the new run_id (rank.reuse_unchanged).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from model.checkpoints import CheckpointMismatch
from model.mllm import embedder_id
from model.text_encoder import text_encoder_dim
from ops.rank import (RESULT_SCHEMA, GallerySearch, QueryOp, RankError, describer_id, file_digest, needs,
                      resolve)
from ops.schemas import GALLERY, RANKINGS, REJECT_REASON, query_vectors_schema, vector_dim
from ops.storage import filesystem, is_s3, read_json, write_bytes
from pipelines.common import (
    StageOutput,
    duplicate_ids,
    map_with_model,
    read_queries,
    select_work,
    stage_and_commit,
)
from pipelines.common import write_staging
from pipelines.context import RunContext, Summary
from pipelines.lake import Lake, TableError, has_vector_index, sql_in

SAFETENSORS = "diffusion_pytorch_model.safetensors"
# rank settings that say which run it is, or what to keep, not what a ranking is.
NOT_SHAPING_RANKINGS = ("run_id", "reuse_unchanged", "keep_runs")


def run(ctx: RunContext) -> Summary:
    cfg, lake = ctx.cfg, ctx.lake
    summary = Summary("rank", note=f"run {ctx.run_id}")
    # What can be refused without Ray is refused first, before any Ray start-up or read.
    search_kind = check_gallery(ctx)
    use = needs(cfg.rank.mode, cfg.rank.text_query)
    checkpoints = checkpoint_uris(ctx, use)
    ctx.start_ray()
    # Read once into the object store: counted, checked for repeated ids and resolved
    # from there (each read of a small file costs a Ray Data job).
    queries = read_queries(ctx).materialize()
    summary.read = queries.count()
    if summary.read == 0:
        raise RankError(f"the queries table {cfg.catalogue.queries} is empty: nothing to rank")
    versions = model_versions(ctx, use)
    repeated = duplicate_ids(
        queries,
        "query_id",
        cfg.ingest.duplicate_check_partitions,
        summary.read,
        cfg.ingest.duplicate_check_local_max_rows,
    )
    # Resolved once (each reference read and hashed once), then used by both steps.
    resolved = queries.map_batches(
        resolve,
        batch_format="pyarrow",
        fn_kwargs=dict(tables=lake, mode=cfg.rank.mode, versions=versions, duplicate_ids=repeated),
    ).materialize()
    query_vectors(ctx, summary, resolved, checkpoints)
    if ctx.dry_run:
        return summary
    run_date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    provenance = {
        "run_id": ctx.run_id,
        "run_date": run_date,
        "mode": cfg.rank.mode,
        "prior_version": versions.get("prior"),
        "adapter_version": versions.get("adapter"),
        "embedder": cfg.models.embedder.name_or_path,
        "config_hash": _digest(
            {
                **versions,
                "rank": {k: x for k, x in ctx.conf["rank"].items() if k not in NOT_SHAPING_RANKINGS},
                "index": ctx.conf["index"] if search_kind == "ann" else None,
            }
        ),
    }
    inputs = _digest({"config": provenance["config_hash"], "queries": queries_fingerprint(resolved),
                      **{t: (lake.open(t).version if lake.open(t) else None)
                         for t in ("embeddings", "query_vectors")}})
    last = read_json(latest_run_uri(lake), lake.s3)
    if cfg.rank.reuse_unchanged and unchanged_since(lake, last, inputs, ctx.run_id):
        # Nothing a ranking depends on moved: the last run's rows stand, relabelled.
        staged = lake.open("rankings").scanner(columns=RESULT_SCHEMA.names,
                                               filter=f"run_id = '{last['run_id']}'")
        summary.written, summary.extra["rows"] = last["queries"], last["rows"]
        summary.extra["reused_run"] = last["run_id"]
    else:
        staged = search(ctx, resolved, search_kind)
        summary.extra["rows"] = 0 if staged is None else staged.count_rows()
        if summary.extra["rows"] == 0:
            lake.clear_staging("rank_results")
            raise RankError(
                f"no query could be ranked ({summary.rejected} rejected: see the rejects table); "
                f"nothing was written for run {ctx.run_id}"
            )
        summary.written = len(set(staged.to_table(columns=["query_id"]).column("query_id").to_pylist()))
    summary.note = f"run {ctx.run_id}; " + publish(lake, staged, provenance)
    latest = {"run_id": ctx.run_id, "inputs": inputs, "queries": summary.written,
              "rows": summary.extra["rows"]}
    write_bytes(latest_run_uri(lake), json.dumps(latest).encode(), lake.s3)
    expired = expire_runs(lake, cfg.rank.keep_runs)
    if expired:
        summary.extra["runs_expired"] = len(expired)
    summary.outputs["parquet"] = rankings_parquet_uri(lake, run_date, ctx.run_id)
    lake.clear_staging("rank_results")
    return summary


def check_gallery(ctx: RunContext) -> str:
    """Refuses an empty gallery or one of another dimension; returns the search to use
    (exact where rank.search is ann but no index was built)."""
    lake, dim = ctx.lake, ctx.cfg.models.embedder.dim
    gallery = lake.open("embeddings")
    if gallery is None or gallery.count_rows(filter=GALLERY) == 0:
        raise RankError(
            f"the gallery is empty: {lake.uri('embeddings')} has no vectors of kind image; run embed first"
        )
    if vector_dim(gallery.schema) != dim:
        raise TableError(
            f"the gallery's vectors have size {vector_dim(gallery.schema)} but models.embedder.dim "
            f"is {dim}: refusing to rank"
        )
    if ctx.cfg.rank.search == "ann" and not has_vector_index(gallery):
        print(f"[rank] no vector index on {lake.uri('embeddings')} (run `index`): searching exactly")
        return "exact"
    return ctx.cfg.rank.search


def checkpoint_uris(ctx: RunContext, use: set[str]) -> dict:
    """Where the mode's checkpoints are (each query actor fetches its own copy), checked
    against the gallery's and the text encoder's sizes before any query is sampled."""
    cfg, s3 = ctx.cfg, ctx.lake.s3
    if "prior" not in use:
        return {}
    d_vl = cfg.models.embedder.dim
    cond_dim = text_encoder_dim(ctx.conf["models"]["text_encoder"], ctx.conf["models"]["embedder"])
    found = read_json(f"{cfg.train_stage1.output.rstrip('/')}/config.json", s3)
    if found is None:
        raise CheckpointMismatch(
            f"no prior checkpoint at {cfg.train_stage1.output}: run train_stage1 first "
            f"(or point train_stage1.output at one)"
        )
    if found.get("d_vl") != d_vl:
        raise CheckpointMismatch(
            f"the gallery's vectors have size {d_vl} but the prior at "
            f"{cfg.train_stage1.output} was trained on d_vl={found.get('d_vl')}: "
            f"they come from different embedders"
        )
    out = {"prior": cfg.train_stage1.output, "expected_prior": {"d_vl": d_vl, "cond_dim": cond_dim}}
    if "adapter" in use:
        if read_json(f"{cfg.train_stage2.output.rstrip('/')}/config.json", s3) is None:
            raise CheckpointMismatch(
                f"no Control-Adapter checkpoint at {cfg.train_stage2.output}: run train_stage2 first"
            )
        out["adapter"] = cfg.train_stage2.output
    return out


def model_versions(ctx: RunContext, use: set[str]) -> dict:
    """The models and settings a mode's vectors depend on (part of each query's key)."""
    cfg, conf, m = ctx.cfg, ctx.conf, ctx.cfg.models
    out = {"mode": cfg.rank.mode, "seed": cfg.seed}
    if "describer" in use:
        # The triplets' `describer` column names it the same way; the concept template is
        # rank's alone (a triplet has no shared concept).
        out.update(describer=describer_id(conf["models"]["describer"], conf["rank"]),
                   template=cfg.rank.describe_template)
    if "embedder" in use:
        out.update(embedder=embedder_id(conf["models"]["embedder"]))
    if "text_encoder" in use:
        out.update(text_encoder=[m.text_encoder.kind, m.text_encoder.name_or_path, m.text_encoder.max_tokens])
    if "prior" in use:
        out.update(
            prior=file_digest(f"{cfg.train_stage1.output.rstrip('/')}/{SAFETENSORS}", ctx.lake.s3),
            sampling=conf["sampling"],
            diffusion=conf["diffusion"],
        )
    if "adapter" in use:
        out["adapter"] = file_digest(f"{cfg.train_stage2.output.rstrip('/')}/{SAFETENSORS}", ctx.lake.s3)
    if cfg.rank.mode == "joint":
        out["joint_weight"] = cfg.rank.joint_weight
    if cfg.rank.mode == "text":
        out["text_query"] = cfg.rank.text_query
    return out


def query_vectors(ctx: RunContext, summary: Summary, resolved: ray.data.Dataset, checkpoints: dict) -> None:
    """Vectors of the queries whose key changed, committed to `query_vectors` (rejects to
    `rejects`); the counts go into `summary` (in a dry run: new, changed, unchanged)."""
    cfg = ctx.cfg
    use = needs(cfg.rank.mode, cfg.rank.text_query)
    samples = cfg.sampling.samples_per_query if ("prior" in use and cfg.sampling.aggregation == "none") else 1
    schema = query_vectors_schema(samples * cfg.models.embedder.dim)
    staged_schema = schema.append(REJECT_REASON).append(pa.field("uri", pa.string()))
    out = StageOutput("rank", staged_schema, "query_vectors", ("query_id", "mode"), schema,
                      reject_key="query_id")
    todo = select_work(ctx, summary, resolved, out, table="query_vectors", key="query_id",
                       compare={"query_key": "query_key"}, where=f"mode = '{cfg.rank.mode}'")
    if ctx.dry_run:  # the counts are select_work's: new, changed, unchanged, rejected
        summary.rejected = summary.extra["rejected"]
        return
    counts = {"written": 0, "rejected": 0}
    if todo is not None:
        staged = map_with_model(todo, ctx, QueryOp, "rank", checkpoints=checkpoints, schema=staged_schema)
        counts = stage_and_commit(staged, ctx, out)
    summary.skipped = 0
    summary.rejected = counts["rejected"]
    summary.extra.update(
        computed=counts["written"], reused=summary.read - counts["written"] - counts["rejected"]
    )


def search(ctx: RunContext, resolved: ray.data.Dataset, search_kind: str) -> lance.LanceDataset | None:
    """Every ranked query's top-k, staged as a Lance dataset (rank_results; None: no rows)."""
    gpus = ctx.cfg.rank.search_num_gpus
    ctx.require("rank's gallery search", 1, gpus, "rank.search_num_gpus")
    results = resolved.map_batches(
        search_batch,
        fn_kwargs=dict(conf=ctx.conf, tables=ctx.lake, search_kind=search_kind),
        # One search at a time (each holds search_batch_size x gallery_block scores).
        compute=ray.data.TaskPoolStrategy(size=1),
        num_gpus=gpus,
        batch_size=ctx.cfg.rank.search_batch_size,
        batch_format="pyarrow",
    )
    write_staging(results, ctx.lake, "rank_results", RESULT_SCHEMA)
    return ctx.lake.open_staging("rank_results")


def search_batch(batch: pa.Table, conf: dict, tables: Lake, search_kind: str) -> pa.Table:
    """GallerySearch as a task, not an actor: it holds no model, and a task runs in a
    worker that has imported ops/ where an actor starts a process and imports torch
    again, a fixed cost of every rank run."""
    return GallerySearch(conf, tables, search_kind)(batch)


def queries_fingerprint(resolved: ray.data.Dataset) -> str:
    """An order-free digest of every resolved query (id, key, reject reason): a query
    added, removed, re-keyed or newly rejected changes it. One pass over the
    materialised queries; only a number per block reaches the driver."""
    def block_sum(batch: pa.Table) -> pa.Table:
        rows = zip(*(batch.column(c).to_pylist() for c in ("query_id", "query_key", "reject_reason")))
        total = sum(int.from_bytes(hashlib.sha256(repr(r).encode()).digest()[:8], "big") for r in rows)
        return pa.table({"sum": [str(total)], "n": [batch.num_rows]})

    parts = resolved.map_batches(block_sum, batch_format="pyarrow").take_all()
    return f"{sum(int(p['sum']) for p in parts) % 2**64:016x}:{sum(p['n'] for p in parts)}"


def latest_run_uri(lake: Lake) -> str:
    """What the last published run was made from (rank.reuse_unchanged)."""
    return f"{lake.root}/rankings/_latest.json"


def unchanged_since(lake: Lake, last: dict | None, inputs: str, run_id: str) -> bool:
    """Whether the last published run had these inputs, and its rows are still there."""
    if not last or last.get("inputs") != inputs or last.get("run_id") == run_id:
        return False
    table = lake.open("rankings")
    return table is not None and table.count_rows(filter=f"run_id = '{last['run_id']}'") == last.get("rows")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _with_provenance(reader, provenance: dict):
    for b in reader:
        n = b.num_rows
        cols = {
            name: (
                b.column(name)
                if name in b.schema.names
                else pa.array([provenance[name]] * n, RANKINGS.field(name).type)
            )
            for name in RANKINGS.names
        }
        yield pa.record_batch(
            [cols[n_].cast(RANKINGS.field(n_).type) for n_ in RANKINGS.names], schema=RANKINGS
        )


def rankings_parquet_uri(lake: Lake, run_date: str, run_id: str) -> str:
    return f"{lake.root}/rankings/run_date={run_date}/{run_id}.parquet"


def publish(lake: Lake, staged, provenance: dict) -> str:
    """The run's rows to Parquet (one object, made visible whole) and to `rankings.lance`
    (appended; a rerun's old rows deleted first)."""
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
        table = lance.write_dataset(
            source, lake.uri("rankings"), schema=RANKINGS, storage_options=lake.storage_options
        )
        # Runs are found (a rerun's old rows, retention) through this index, not by a scan.
        table.create_scalar_index("run_id", index_type="BTREE")
    else:
        # A run costs what it writes, not what history holds: a rerun of the same run id
        # first deletes its old rows (through the run_id index), then the run is appended.
        # Between the two commits a reader sees that run missing; its Parquet object,
        # replaced whole above, is the atomic copy.
        if table.count_rows(filter=f"run_id = '{run_id}'"):
            table.delete(f"run_id = '{run_id}'")
        lance.write_dataset(source, lake.uri("rankings"), schema=RANKINGS, mode="append",
                            storage_options=lake.storage_options)
    return f"rankings at {uri} and {lake.uri('rankings')}"


def expire_runs(lake: Lake, keep: int) -> list[str]:
    """Retention (rank.keep_runs; 0 keeps all): the runs beyond the newest `keep`, by
    when their Parquet object was written, lose that object and their rows of
    `rankings.lance` (one delete through the run_id index). The run ids removed."""
    from pyarrow.fs import FileSelector

    if keep <= 0:
        return []
    fs, base = filesystem(f"{lake.root}/rankings", lake.s3)
    files = [i for i in fs.get_file_info(FileSelector(base, allow_not_found=True, recursive=True))
             if i.base_name.endswith(".parquet") and not i.base_name.startswith(".")]
    files.sort(key=lambda i: i.mtime, reverse=True)
    old = files[keep:]
    runs = [i.base_name[: -len(".parquet")] for i in old]
    table = lake.open("rankings")
    if runs and table is not None:
        table.delete(sql_in("run_id", runs))
    for i in old:
        fs.delete_file(i.path)
    return runs
