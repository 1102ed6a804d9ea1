"""Stage `ingest`: catalogue manifest -> `images` (image_id, uri, sha256, width, height)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import ray

from ops.ingest import OUTPUT_SCHEMA, IngestOp
from ops.schemas import IMAGES
from ops.storage import filesystem
from pipelines.common import StageSummary, init_ray, plain, stage_and_commit
from pipelines.lake import Lake
from pipelines.stages import keep_changed

REQUIRED_COLUMNS = ("image_id", "uri")


class ManifestError(ValueError):
    pass


def read_manifest(uri: str, s3: dict, required=REQUIRED_COLUMNS, optional=("caption",),
                  what: str = "manifest") -> ray.data.Dataset:
    """A Parquet or CSV table of string columns (`what` names it in errors): `required`
    ones must be there, `optional` ones are kept when they are."""
    fs, path = filesystem(uri, s3)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise ManifestError(f"{what} {uri}: cannot be read: {e}") from None
    if info.type.name == "NotFound":
        raise ManifestError(f"{what} {uri} does not exist")
    if uri.endswith(".csv"):
        # ids like 00012 must stay strings, not become the integer 12
        opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in (*required, *optional)},
                                    strings_can_be_null=True)
        ds = ray.data.read_csv(path, filesystem=fs, convert_options=opts)
    elif uri.endswith(".parquet") or info.type.name == "Directory":
        ds = ray.data.read_parquet(path, filesystem=fs)
    else:
        raise ManifestError(f"{what} {uri}: expected a .parquet file or folder, or a .csv file")
    names = ds.schema().names
    missing = [c for c in required if c not in names]
    if missing:
        raise ManifestError(f"{what} {uri} has no column {missing[0]!r} (columns: {', '.join(names)}); "
                            f"required: {', '.join(required)}")
    columns = [c for c in (*required, *optional) if c in names]
    return ds.select_columns(columns)


def duplicate_ids(ds: ray.data.Dataset, partitions: int, rows: int, local_max_rows: int) -> frozenset[str]:
    """Ids that occur more than once: counted on the driver for small manifests, else by a
    distributed count of which only the repeats reach the driver."""
    if rows <= local_max_rows:
        ids = pa.concat_arrays([r.column("image_id").combine_chunks().cast(pa.string())
                                for r in ray.get(ds.select_columns(["image_id"]).to_arrow_refs()) if r.num_rows]) \
            if rows else pa.array([], pa.string())
        counts = pc.value_counts(ids)
        repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
        return frozenset(str(i) for i in repeated if i not in (None, ""))
    counts = ds.select_columns(["image_id"]).groupby("image_id", num_partitions=partitions).count()

    def repeats(t: pa.Table) -> pa.Table:
        return t.filter(pc.greater(t.column(t.schema.names[-1]), 1)).select(["image_id"])

    return frozenset(str(r["image_id"]) for r in counts.map_batches(repeats, batch_format="pyarrow").take_all()
                     if r["image_id"] not in (None, ""))


def run(cfg) -> StageSummary:
    init_ray(cfg)
    lake = Lake.from_conf(cfg)
    summary = StageSummary("ingest")
    manifest = read_manifest(cfg.catalogue.manifest, lake.s3)
    summary.read = manifest.count()
    dups = duplicate_ids(manifest, cfg.ingest.duplicate_check_partitions, summary.read,
                         cfg.ingest.duplicate_check_local_max_rows)
    staged = (
        manifest.map_batches(
            IngestOp, fn_constructor_kwargs=dict(limits=plain(cfg.images), s3=lake.s3, duplicate_ids=dups),
            compute=ray.data.ActorPoolStrategy(size=cfg.ingest.num_actors), batch_size=cfg.ingest.batch_size,
            batch_format="numpy", num_cpus=1)
        .map_batches(keep_changed, batch_format="pyarrow", fn_kwargs=dict(
            table_uri=lake.uri("images"), storage_options=lake.storage_options,
            compare={"sha256": "sha256", "uri": "uri", "source_caption": "source_caption"}))
    )
    counts = stage_and_commit(staged, lake, "ingest", OUTPUT_SCHEMA, "images", ["image_id"], IMAGES)
    summary.written, summary.rejected = counts["written"], counts["rejected"]
    summary.skipped = summary.read - summary.written - counts["rejected"]
    return summary
