"""What the stages share: reading tables and manifests, skipping unchanged rows, staging and commit.

Stage modules import this module and never each other (tests/test_layout.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import ray

from model.errors import PipelineError
from ops.schemas import TRIPLET_COLUMNS
from ops.storage import filesystem
from pipelines.context import RunContext, Summary
from pipelines import lake as lake_tables
from pipelines.lake import Lake, check_vector_dim

log = logging.getLogger("pipelines")


class ManifestError(PipelineError):
    pass


def read_table(lake: Lake, table: str, columns: Sequence[str] | None = None,
               filter: str | None = None) -> ray.data.Dataset:
    return ray.data.read_lance(lake.uri(table), columns=list(columns) if columns else None, filter=filter,
                               storage_options=lake.storage_options)


def table_columns(uri: str, s3: dict, what: str = "manifest") -> list[str]:
    """The column names of a Parquet file or folder, or of a CSV file's header, read
    without Ray and without reading the rows; a ManifestError naming `what` when the
    table is missing, unreadable or of another format."""
    import pyarrow.dataset as pads

    fs, path = filesystem(uri, s3)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise ManifestError(f"{what} {uri}: cannot be read: {e}") from None
    if info.type.name == "NotFound":
        raise ManifestError(f"{what} {uri} does not exist")
    try:
        if uri.endswith(".csv"):
            with fs.open_input_stream(path) as f:
                return list(pacsv.open_csv(f).schema.names)
        if uri.endswith(".parquet") or info.type.name == "Directory":
            return list(pads.dataset(path, filesystem=fs, format="parquet").schema.names)
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{what} {uri}: cannot be read as a table: {str(e).splitlines()[0]}") from None
    raise ManifestError(f"{what} {uri}: expected a .parquet file or folder, or a .csv file")


def check_columns(uri: str, s3: dict, required: Sequence[str], what: str,
                  one_of: Sequence[str] = ()) -> list[str]:
    """The table's columns, after checking it has every `required` one (and at least one
    of `one_of`); a ManifestError naming the table and the column otherwise."""
    names = table_columns(uri, s3, what)
    missing = [c for c in required if c not in names]
    if missing:
        raise ManifestError(f"{what} {uri} has no column {missing[0]!r} (columns: {', '.join(names)}); "
                            f"required: {', '.join(required)}")
    if one_of and not any(c in names for c in one_of):
        raise ManifestError(f"{what} {uri} has neither {' nor '.join(map(repr, one_of))} (columns: "
                            f"{', '.join(names)}): each query names its reference image by one of them")
    return names


def read_manifest(uri: str, s3: dict, required: Sequence[str] = ("image_id", "uri"),
                  optional: Sequence[str] = ("caption",), what: str = "manifest") -> ray.data.Dataset:
    """A Parquet or CSV table of string columns (`what` names it in errors): `required`
    ones must be there, `optional` ones are kept when they are."""
    names = check_columns(uri, s3, required, what)
    fs, path = filesystem(uri, s3)
    if uri.endswith(".csv"):
        # ids like 00012 must stay strings, not become the integer 12
        opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in (*required, *optional)},
                                    strings_can_be_null=True)
        ds = ray.data.read_csv(path, filesystem=fs, convert_options=opts)
    else:
        ds = ray.data.read_parquet(path, filesystem=fs)
    return ds.select_columns([c for c in (*required, *optional) if c in names])


QUERY_COLUMNS = ("query_id", "modification_text")
QUERY_REFERENCE_COLUMNS = ("reference_id", "reference_uri")
OPTIONAL_QUERY_COLUMNS = (*QUERY_REFERENCE_COLUMNS, "shared_concept", "target_id")
MANIFEST_COLUMNS = ("image_id", "uri")
# Each catalogue input: the stages that read it, its required columns, and the columns
# of which it needs at least one. Preflight and nightly check them before any work.
CATALOGUE_INPUTS = {
    "manifest": (("ingest",), MANIFEST_COLUMNS, ()),
    "queries": (("rank",), QUERY_COLUMNS, QUERY_REFERENCE_COLUMNS),
    "triplets": (("triplets", "finetune_embedder"), TRIPLET_COLUMNS, ()),
}


def check_inputs(cfg, stages: Sequence[str]) -> list[tuple[str, str]]:
    """(what, detail) for each catalogue input that one of `stages` reads, checked to
    exist and to have its columns (a ManifestError at the first that does not), and each
    checkpoint a rank mode needs that none of `stages` trains (a CheckpointMismatch)."""
    from model.checkpoints import CheckpointMismatch
    from ops.rank import needs
    from ops.storage import read_json

    s3, out = dict(cfg.storage.s3), []
    for name, (readers, required, one_of) in CATALOGUE_INPUTS.items():
        if any(s in stages for s in readers):
            uri = cfg.catalogue[name]
            names = check_columns(uri, s3, required, name, one_of)
            out.append((f"catalogue.{name}", f"{uri}: {', '.join(names)}"))
    if "rank" in stages:
        use = needs(cfg.rank.mode, cfg.rank.text_query)
        for model, stage, key in (("prior", "train_stage1", cfg.train_stage1.output),
                                  ("adapter", "train_stage2", cfg.train_stage2.output)):
            if model not in use or stage in stages:
                continue
            if read_json(f"{key.rstrip('/')}/config.json", s3) is None:
                raise CheckpointMismatch(
                    f"rank.mode={cfg.rank.mode} needs the {model} at {stage}.output = {key}, and there is "
                    f"none: run {stage} first, point {stage}.output at a checkpoint, or choose a mode "
                    f"without it (query_only, joint)")
            out.append((f"{stage}.output", f"{key}: a {model} checkpoint"))
    return out


def read_queries(ctx: RunContext) -> ray.data.Dataset:
    """The composed queries of `catalogue.queries` (the rank stage's input)."""
    return read_manifest(ctx.cfg.catalogue.queries, ctx.lake.s3, required=QUERY_COLUMNS,
                         optional=OPTIONAL_QUERY_COLUMNS, what="queries")


def duplicate_ids(
    ds: ray.data.Dataset, key: str, partitions: int, rows: int, local_max_rows: int
) -> frozenset[str]:
    """Values of `key` that occur more than once: counted on the driver for small tables,
    else by a distributed count of which only the repeats reach the driver."""
    if rows <= local_max_rows:
        ids = (
            pa.concat_arrays(
                [
                    r.column(key).combine_chunks().cast(pa.string())
                    for r in ray.get(ds.select_columns([key]).to_arrow_refs())
                    if r.num_rows
                ]
            )
            if rows
            else pa.array([], pa.string())
        )
        counts = pc.value_counts(ids)
        repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
        return frozenset(str(i) for i in repeated if i not in (None, ""))
    counts = ds.select_columns([key]).groupby(key, num_partitions=partitions).count()

    def repeats(t: pa.Table) -> pa.Table:
        return t.filter(pc.greater(t.column(t.schema.names[-1]), 1)).select([key])

    return frozenset(
        str(r[key])
        for r in counts.map_batches(repeats, batch_format="pyarrow").take_all()
        if r[key] not in (None, "")
    )


@dataclass(frozen=True)
class StageOutput:
    """Where a stage's rows go: its staging dataset (named by the stage, whose conf
    section holds `commit_every`), then `table` by `keys` (good rows) and `rejects`."""

    stage: str
    staged_schema: pa.Schema
    table: str
    keys: tuple[str, ...]
    schema: pa.Schema
    reject_key: str = "image_id"


def resume_staged(ctx: RunContext, summary: Summary, out: StageOutput) -> None:
    """A killed run's staged rows (committed to the staging dataset `commit_every` rows at
    a time as they were made) go to the table before any work is selected, so the rerun
    redoes at most the interval in flight when it died."""
    if ctx.dry_run or ctx.lake.open_staging(out.stage) is None:
        return
    counts = lake_tables.commit(ctx.lake, out.stage, out.table, list(out.keys), out.schema,
                                reject_key=out.reject_key)
    ctx.lake.clear_staging(out.stage)
    summary.extra["resumed"] = counts["written"] + counts["rejected"]
    log.warning("%s: committed %d rows a killed run had staged", out.stage, summary.extra["resumed"])


def select_work(
    ctx: RunContext, summary: Summary, ds: ray.data.Dataset, output: StageOutput | None = None, **compare
) -> ray.data.Dataset | None:
    """The rows of `ds` whose output is missing or stale in the table (ops/tables.py
    classify_changes with `compare`'s arguments), or None when there is nothing to do.
    With `output`, what a killed run staged is committed first (resume_staged).

    In a dry run (ctx.dry_run) it counts them instead, into the summary (new, changed,
    unchanged, rejected), and returns None: the stage then runs no model and writes nothing.
    """
    from ops.tables import classify_changes, count_changes, keep_changed

    if output is not None:
        resume_staged(ctx, summary, output)
    if ctx.dry_run:
        classified = ds.map_batches(
            classify_changes, batch_format="pyarrow", fn_kwargs=dict(tables=ctx.lake, **compare)
        )
        counts = {k: 0 for k in ("new", "changed", "unchanged", "rejected")}
        for row in classified.map_batches(count_changes, batch_format="pyarrow").take_all():
            counts[row["change"]] += row["rows"]
        summary.extra.update(counts)
        summary.skipped = counts["unchanged"]
        summary.note = "dry run: no model ran, nothing was written"
        return None
    todo = ds.map_batches(keep_changed, batch_format="pyarrow", fn_kwargs=dict(tables=ctx.lake, **compare))
    if not any_rows(todo):
        summary.skipped = summary.read
        return None
    return todo


def any_rows(ds: ray.data.Dataset) -> bool:
    """Whether the (filtered) dataset yields a row, found by streaming until the first one:
    on an unchanged catalogue a stage then starts no model actor at all (the keyed
    lookups run, the models do not), and with changes the probe stops early."""
    return ds.limit(1).count() > 0


def in_batches(ds: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """The dataset in blocks of at most `rows` rows (Ray Data's streaming repartition: no
    shuffle, nothing materialised). A map's output leaves its worker only once its whole
    input block is done, and a table is read a fragment's batch at a time (8,192 rows):
    without this a 5,000-row table is one block, so one actor of the pool works, the
    others idle, and the staging is committed once at the end however small
    `commit_every` is, and a kill loses the whole stage."""
    return ds.repartition(target_num_rows_per_block=rows)


def map_with_model(
    ds: ray.data.Dataset, ctx: RunContext, op, section: str, use_gpus: bool = True,
    rebatch: bool = True, **kwargs
) -> ray.data.Dataset:
    """`op(ctx.conf, ctx.lake, **kwargs)` over `ds`, `<section>.num_actors` at a time, each
    with the section's batch size, CPUs and (unless use_gpus is false) GPUs; refused at
    once if the cluster lacks them. On a pool of actors started for the stage, or, with
    ray.model_ops: tasks, as tasks in Ray's reused workers, each keeping the op it built
    (ops/base.py run_kept_op; CPU only, pipelines/config.py). The input is cut into blocks of a batch first
    (`in_batches`) unless `rebatch` is false."""
    s = ctx.cfg[section]
    gpus = s.get("num_gpus_per_actor", 0) if use_gpus else 0
    ctx.require(
        f"{section} (each of {s.num_actors} actors)",
        s.num_cpus_per_actor,
        gpus,
        f"{section}.num_cpus_per_actor / num_gpus_per_actor",
    )
    if rebatch:
        ds = in_batches(ds, s.batch_size)
    common = dict(batch_size=s.batch_size, batch_format="pyarrow", num_cpus=s.num_cpus_per_actor,
                  num_gpus=gpus)
    if ctx.cfg.ray.model_ops == "actors":
        return ds.map_batches(op, fn_constructor_args=(ctx.conf, ctx.lake), fn_constructor_kwargs=kwargs,
                              compute=ray.data.ActorPoolStrategy(size=s.num_actors), **common)
    from ops.base import run_kept_op

    return ds.map_batches(run_kept_op, fn_kwargs=dict(op=op, args=(ctx.conf, ctx.lake), kwargs=kwargs,
                                                      key=kept_op_key(op, ctx, kwargs)),
                          compute=ray.data.TaskPoolStrategy(size=s.num_actors), **common)


def kept_op_key(op, ctx: RunContext, kwargs: dict) -> str:
    """What a kept op was built from (ray.model_ops: tasks): the op, the whole config, the
    lake, its arguments, and the size and modification time of every file of each local
    model folder or checkpoint they name, so that weights rewritten in place (a rerun of
    finetune_embedder, a retrained prior) are loaded again."""
    import hashlib
    import json
    import os

    def files(path: str) -> list:
        if os.path.isfile(path):
            st = os.stat(path)
            return [[path, st.st_size, st.st_mtime_ns]]
        out = []
        for root, _, names in os.walk(path):
            out += [f for n in sorted(names) for f in files(os.path.join(root, n))]
        return out

    paths = [m.get("name_or_path") for m in ctx.conf["models"].values() if isinstance(m, dict)]
    paths += [v for x in kwargs.values() for v in (x.values() if isinstance(x, dict) else [x])
              if isinstance(v, str)]
    stamps = [files(p) for p in sorted({p for p in paths if p and os.path.exists(p)})]
    what = [f"{op.__module__}.{op.__qualname__}", ctx.conf, ctx.lake.root, kwargs, stamps]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def begin_model_stage(
    ctx: RunContext,
    stage: str,
    source: str = "images",
    source_filter: str | None = None,
    needs: str = "ingest",
) -> Summary | None:
    """The summary of a stage that runs a model over the table `source`, with its rows
    counted; None when that table is empty (the stage before, `needs`, has not run)."""
    ctx.start_ray()
    summary = Summary(stage, read=ctx.lake.count(source, source_filter))
    if summary.read == 0:
        summary.note = f"the {source} table is empty or missing: run {needs} first"
        print(f"[{stage}] {summary.note}")
        return None
    return summary


def check_embedder(ctx: RunContext, table: str = "embeddings", column: str = "vector") -> None:
    """Refuses a wrong-sized embedder or table (of the embedder's vectors) before any image is read."""
    from transformers import AutoConfig

    from ops.embed import check_embedder_dim

    model = ctx.cfg.models.embedder
    check_embedder_dim(
        model.name_or_path,
        AutoConfig.from_pretrained(model.name_or_path).get_text_config().hidden_size,
        model.dim,
    )
    ds = ctx.lake.open(table)
    if ds is not None:
        check_vector_dim(ds, model.dim, ctx.lake.uri(table), column)


def write_staging(ds, lake: Lake, stage: str, schema, commit_every: int | None = None) -> None:
    """Streams a dataset into the stage's (emptied) staging Lance dataset. With
    `commit_every`, each batch of that many rows is committed to the staging as it comes
    (lance_ray's streaming write, through the driver), so a killed run keeps what it
    made; without, the workers write in parallel and one commit ends the write."""
    import lance_ray

    lake.clear_staging(stage)
    streaming = dict(stream=True, batch_size=commit_every) if commit_every else {}
    lance_ray.write_lance(
        ds, lake.staging_uri(stage), schema=schema, mode="create", storage_options=lake.storage_options,
        **streaming,
    )


def stage_and_commit(ds, ctx: RunContext, out: StageOutput) -> dict[str, int]:
    """Writes a stage's output to its staging dataset (committed every
    `<stage>.commit_every` rows), then commits it to the table and `rejects`
    (pipelines.lake.commit) and empties the staging."""
    write_staging(ds, ctx.lake, out.stage, out.staged_schema, ctx.cfg[out.stage].commit_every)
    counts = lake_tables.commit(ctx.lake, out.stage, out.table, list(out.keys), out.schema,
                                reject_key=out.reject_key)
    ctx.lake.clear_staging(out.stage)
    return counts
