"""The lake: Lance tables at <storage.root>/<table>.lance, written idempotently.

Every stage writes its output (good rows and rejects together) to a staging dataset
with Ray Data, then commits it to the tables here with one `merge_insert` per table,
keyed, so a rerun after a crash neither duplicates nor loses rows: nothing reaches a
table until the commit, and the commit is atomic in Lance.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.errors import PipelineError
from ops.schemas import REJECTS, vector_dim
from ops.storage import filesystem, lance_storage_options


class TableError(PipelineError):
    pass


@dataclass(frozen=True)
class Lake:
    root: str
    staging_root: str
    s3: dict

    @classmethod
    def from_conf(cls, cfg) -> "Lake":
        return cls(cfg.storage.root.rstrip("/"), cfg.storage.staging.rstrip("/"), dict(cfg.storage.s3))

    @property
    def storage_options(self) -> dict[str, str]:
        return lance_storage_options(self.s3)

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}.lance"

    def staging_uri(self, stage: str) -> str:
        return f"{self.staging_root}/{stage}.lance"

    def open(self, table: str) -> lance.LanceDataset | None:
        return open_dataset(self.uri(table), self.storage_options)

    def open_staging(self, stage: str) -> lance.LanceDataset | None:
        return open_dataset(self.staging_uri(stage), self.storage_options)

    def restore(self, table: str, version: int) -> None:
        """Makes `version` of `table` (its rows and indices) the newest again, in one new
        commit; the versions between stay in its history until `compact` expires them."""
        lance.dataset(self.uri(table), version=version, storage_options=self.storage_options).restore()

    def clear_staging(self, stage: str) -> None:
        """Removes a stage's staged rows (a crashed run's, or a committed run's)."""
        fs, path = filesystem(self.staging_uri(stage), self.s3)
        try:
            fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass

    def add_missing_columns(self, table: str, schema: pa.Schema) -> list[str]:
        """Migrates a table written by an older version: the nullable columns `schema` ends
        with and the table lacks are added, all null, in one metadata-only commit. The
        names added ([] when none, or no table). Anything else that differs is left for
        `_upsert` to refuse."""
        ds = self.open(table)
        if ds is None:
            return []
        have = ds.schema.names
        missing = [f for f in schema if f.name not in have]
        if not missing or not all(f.nullable for f in missing) or have != schema.names[:len(have)]:
            return []
        ds.add_columns(missing)
        return [f.name for f in missing]

    def count(self, table: str, filter: str | None = None) -> int:
        ds = self.open(table)
        return 0 if ds is None else ds.count_rows(filter=filter)

    # -- ops/tables.py TableReader: what per-batch functions read of the lake

    def lookup(self, table: str, ids: Sequence[str], columns: Sequence[str], key: str = "image_id",
               where: str | None = None) -> dict[str, dict]:
        return lookup(self.open(table), ids, columns, key=key, where=where)

    def scan(self, table: str, columns: Sequence[str], filter: str | None = None,
             batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        ds = self.open(table)
        if ds is not None:
            yield from ds.to_batches(columns=list(columns), filter=filter, batch_size=batch_size)

    def nearest(self, table: str, vectors, k: int, where: str | None, nprobes: int,
                refine_factor: int) -> list[list[tuple[str, float]]]:
        """The k nearest rows to each of `vectors` (n x d) by the table's vector index, in
        one call: per vector, [(image_id, cosine), ...] best first."""
        import lancedb

        t = lancedb.connect(self.root, storage_options=self.storage_options).open_table(table)
        vectors = np.asarray(vectors, np.float32)
        q = t.search(list(vectors), vector_column_name="vector").metric("cosine")
        if where:
            q = q.where(where, prefilter=True)
        q = q.nprobes(nprobes).refine_factor(refine_factor).limit(k)
        hits = q.select(["image_id", "_distance"]).to_arrow()
        found: list[list[tuple[str, float]]] = [[] for _ in range(len(vectors))]
        # One vector: lancedb answers without a query_index column.
        cols = hits.column_names
        which = hits.column("query_index").to_pylist() if "query_index" in cols else [0] * hits.num_rows
        distances = hits.column("_distance").to_pylist()
        for i, image_id, d in zip(which, hits.column("image_id").to_pylist(), distances):
            found[i].append((image_id, 1.0 - d))
        return [sorted(f, key=lambda h: -h[1]) for f in found]


def open_dataset(uri: str, storage_options: dict) -> lance.LanceDataset | None:
    try:
        return lance.dataset(uri, storage_options=storage_options)
    except (ValueError, FileNotFoundError, OSError) as e:
        if (
            "not found" in str(e).lower()
            or "does not exist" in str(e).lower()
            or isinstance(e, FileNotFoundError)
        ):
            return None
        raise


def sql_in(column: str, values: Iterable[str]) -> str:
    quoted = ",".join("'" + str(v).replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"


def lookup(
    ds: lance.LanceDataset | None,
    ids: Sequence[str],
    columns: Sequence[str],
    key: str = "image_id",
    where: str | None = None,
) -> dict[str, dict]:
    """Rows of `ds` whose key is in `ids`, as key -> row; one scan with a pushed-down filter.
    A column the table lacks (written before the column existed) reads as null."""
    if ds is None or len(ids) == 0:
        return {}
    flt = sql_in(key, ids) + (f" AND {where}" if where else "")
    wanted = list(dict.fromkeys([key, *columns]))
    table = ds.to_table(columns=[c for c in wanted if c in ds.schema.names], filter=flt)
    absent = {c: None for c in wanted if c not in ds.schema.names}
    return {r[key]: {**r, **absent} for r in table.to_pylist()}


def check_vector_dim(ds: lance.LanceDataset, expected: int, table: str, column: str = "vector") -> None:
    found = vector_dim(ds.schema, column)
    if found != expected:
        raise TableError(
            f"table {table!r} holds vectors of size {found}, but models.embedder.dim is {expected}: "
            f"a different embedder wrote it; point storage.root elsewhere or fix the config"
        )


def commit(
    lake: Lake, stage: str, table: str, keys: Sequence[str], schema: pa.Schema, reject_key: str = "image_id"
) -> dict[str, int]:
    """Merge the stage's staged rows into `table` (good rows) and `rejects` (the rest)."""
    staged = open_dataset(lake.staging_uri(stage), lake.storage_options)
    counts = {"written": 0, "rejected": 0}
    if staged is None:
        return counts
    good = staged.scanner(columns=schema.names, filter="reject_reason IS NULL").to_reader()
    counts["written"] = _upsert(lake, table, keys, schema, good)
    good_keys = staged.scanner(columns=[reject_key], filter="reject_reason IS NULL").to_reader()
    _clear_stale_rejects(lake, stage, good_keys, reject_key)
    now = pa.scalar(dt.datetime.now(dt.timezone.utc), type=REJECTS.field("run_at").type)
    uri_col = "uri" if "uri" in staged.schema.names else None

    def rejects():
        cols = [reject_key, "reject_reason"] + ([uri_col] if uri_col else [])
        for batch in staged.scanner(columns=cols, filter="reject_reason IS NOT NULL").to_batches():
            n = batch.num_rows
            keys_ = pc.if_else(
                pc.equal(batch[reject_key], ""), pa.array(["<empty image_id>"] * n), batch[reject_key]
            )
            yield pa.record_batch(
                [
                    pa.array([stage] * n),
                    keys_.cast(pa.string()),
                    batch[uri_col] if uri_col else pa.nulls(n, pa.string()),
                    batch["reject_reason"],
                    pa.array([now.as_py()] * n, type=REJECTS.field("run_at").type),
                ],
                schema=REJECTS,
            )

    _upsert(lake, "rejects", ["stage", "key"], REJECTS, pa.RecordBatchReader.from_batches(REJECTS, rejects()))
    # Every rejected input row counts, even where several share a key (empty ids).
    counts["rejected"] = staged.count_rows(filter="reject_reason IS NOT NULL")
    return counts


def delete_absent(lake: Lake, table: str, key: str, present: pa.RecordBatchReader,
                  max_fraction: float | None = None, dry_run: bool = False,
                  before_commit: Callable[[], None] | None = None) -> int:
    """Deletes, in one commit, the rows of `table` whose `key` is not among `present`'s
    (an anti-join inside Lance); the number of rows deleted (dry run: that would be).

    The deletion is prepared uncommitted first: more than `max_fraction` of the table is
    refused with nothing deleted (a truncated manifest must not empty the catalogue).
    `before_commit` runs only when rows are to go, just before they do (the tables that
    depend on this one are cleaned first, so a kill in between leaves no orphans).
    """
    ds = lake.open(table)
    if ds is None:
        return 0
    tx, stats = ds.merge_insert(key).when_not_matched_by_source_delete().execute_uncommitted(present)
    n = int(stats["num_deleted_rows"])
    total = ds.count_rows()
    if n and max_fraction is not None and n > max_fraction * total:
        raise TableError(
            f"{lake.uri(table)}: the manifest lacks {n} of its {total} rows, more than "
            f"ingest.max_delete_fraction={max_fraction}; nothing was deleted (check the manifest, "
            f"or raise ingest.max_delete_fraction for this run)"
        )
    if n and not dry_run:
        if before_commit is not None:
            before_commit()
        lance.LanceDataset.commit(lake.uri(table), tx, read_version=ds.version,
                                  storage_options=lake.storage_options)
    return n


def _clear_stale_rejects(lake: Lake, stage: str, good_keys: pa.RecordBatchReader, key: str) -> None:
    """Rows of `rejects` for keys of `stage` that are now good go (their reason is stale)."""
    rejects = lake.open("rejects")
    if rejects is None:
        return
    schema = pa.schema([("stage", pa.string()), ("key", pa.string())])

    def batches():
        for b in good_keys:
            if b.num_rows:
                yield pa.record_batch([pa.array([stage] * b.num_rows), b.column(key).cast(pa.string())],
                                      schema=schema)

    rejects.merge_insert(["stage", "key"]).when_matched_delete().execute(
        pa.RecordBatchReader.from_batches(schema, batches()))


def _dedupe_keys(reader: pa.RecordBatchReader, keys: Sequence[str]) -> pa.RecordBatchReader:
    """Drops repeated keys within a commit (e.g. several rejected rows with an empty id)."""
    seen: set = set()

    def batches():
        for b in reader:
            cols = [b.column(k).to_pylist() for k in keys]
            mask = []
            for key in zip(*cols):
                mask.append(key not in seen)
                seen.add(key)
            if any(mask):
                yield b.filter(pa.array(mask))

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


def _upsert(
    lake: Lake, table: str, keys: Sequence[str], schema: pa.Schema, reader: pa.RecordBatchReader
) -> int:
    reader = _dedupe_keys(reader.cast(schema), keys)
    first = next((b for b in reader if b.num_rows), None)
    ds = lake.open(table)
    if first is None and ds is not None:
        return 0  # no empty commit: a table's version moves only when its rows do
    counter = {"n": 0}

    def counted():
        for b in ([first] if first is not None else []):
            counter["n"] += b.num_rows
            yield b
        for b in reader:
            counter["n"] += b.num_rows
            yield b

    source = pa.RecordBatchReader.from_batches(schema, counted())
    if ds is None:
        lance.write_dataset(
            source, lake.uri(table), schema=schema, mode="create", storage_options=lake.storage_options
        )
        ds = lake.open(table)
    else:
        if lake.add_missing_columns(table, schema):
            ds = lake.open(table)
        if ds.schema.remove_metadata() != schema.remove_metadata():
            raise TableError(f"table {lake.uri(table)} has schema {ds.schema} but this stage writes {schema}")
        (ds.merge_insert(list(keys)).when_matched_update_all().when_not_matched_insert_all().execute(source))
    if counter["n"] and table != "rejects" and not _has_index(ds, keys[0]):
        # Per-batch lookups by key (image_id, triplet_id: the incremental stages) use this index.
        ds.create_scalar_index(keys[0], index_type="BTREE")
    return counter["n"]


def _has_index(ds: lance.LanceDataset, column: str) -> bool:
    return any(column in idx.field_names for idx in ds.describe_indices())


def has_vector_index(ds: lance.LanceDataset | None) -> bool:
    """Whether the `index` stage has built its vector index on `vector`."""
    return ds is not None and any(
        "vector" in idx.field_names and idx.index_type.upper().startswith("IVF")
        for idx in ds.describe_indices()
    )
