"""The main jobs from Python, on the same code as the command line and with the same errors.

    from pipelines import api

    cfg = api.load_config("conf/prod.yaml", ["rank.mode=full"])
    summary = api.run_stage("rank", cfg)            # a Summary: read, written, rejected, ...
    table = api.read_rankings(cfg, summary.outputs["run_id"])   # the rankings it wrote

Everything refused raises a `PipelineError` (model/errors.py) with the message the
command line prints. Commands that write the lake hold its lock (pipelines/lock.py).
"""
from __future__ import annotations

import pyarrow as pa

from model.errors import PipelineError
from pipelines.config import load_config
from pipelines.context import RunContext, Summary, new_run_id
from pipelines.lake import Lake, TableError, sql_in
from pipelines.lock import lake_lock
from pipelines.registry import STAGES

__all__ = ["PipelineError", "load_config", "run_stage", "run_nightly", "read_rankings", "STAGES"]


def run_stage(name: str, cfg, run_id: str | None = None) -> Summary:
    """Stage `name` of the registry on `cfg`, holding the lake's lock."""
    if name not in STAGES:
        raise PipelineError(f"unknown stage {name!r}: stages are {', '.join(STAGES)}")
    run_id = run_id or cfg.rank.run_id or new_run_id()
    with lake_lock(cfg, run_id, name):
        summary = STAGES[name].run(RunContext.create(cfg, run_id))
    summary.outputs.setdefault("run_id", run_id)
    return summary


def run_nightly(cfg) -> dict:
    """`nightly.stages` in order, resuming a killed run; the run's state."""
    from pipelines import nightly

    with lake_lock(cfg, cfg.rank.run_id or new_run_id(), "nightly"):
        return nightly.run(cfg)


def read_rankings(cfg, run_id: str | None = None, query_ids: list[str] | None = None) -> pa.Table:
    """The `rankings` rows of run `run_id` (the newest run when None), sorted by query and rank."""
    table = Lake.from_conf(cfg).open("rankings")
    if table is None:
        raise TableError(f"no rankings table under {cfg.storage.root}: run rank first")
    if run_id is None:
        ids = table.to_table(columns=["run_id"]).column("run_id").unique().to_pylist()
        if not ids:
            raise TableError(f"the rankings table under {cfg.storage.root} is empty")
        run_id = max(ids)
    flt = f"run_id = '{run_id.replace(chr(39), chr(39) * 2)}'"
    if query_ids:
        flt += " AND " + sql_in("query_id", query_ids)
    rows = table.to_table(filter=flt)
    if rows.num_rows == 0:
        raise TableError(f"no rankings of run {run_id!r} under {cfg.storage.root}")
    return rows.sort_by([("query_id", "ascending"), ("rank", "ascending")])
