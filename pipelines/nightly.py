"""`python -m pipelines nightly`: the stages of `nightly.stages`, in order, as one run.

Each stage is incremental on its own (unchanged images run no model; cached query
vectors are reused), so a nightly run on an unchanged catalogue is cheap and writes
the same rankings under a new run_id. The run's state (its run_id, the stages done and
their summary lines) is kept at <storage.root>/_nightly/state.json: a run killed in the
middle is resumed by the next invocation at the stage it was in, with the same run_id.
"""
from __future__ import annotations

import json
import time

import pyarrow as pa

from ops.storage import filesystem, read_json, write_bytes

STAGES = ("ingest", "caption", "embed", "triplets", "conditions", "train_stage1", "train_stage2", "index", "rank",
          "report")


class NightlyError(ValueError):
    pass


def _state_uri(cfg) -> str:
    return f"{cfg.storage.root.rstrip('/')}/_nightly/state.json"


def _load_state(cfg) -> dict | None:
    return read_json(_state_uri(cfg), dict(cfg.storage.s3))


def _save_state(cfg, state: dict) -> None:
    write_bytes(_state_uri(cfg), json.dumps(state, indent=1).encode(), dict(cfg.storage.s3))


def _sample_queries(cfg) -> pa.Table:
    from pipelines.ingest import read_manifest
    from pipelines.rank import OPTIONAL_QUERY_COLUMNS, QUERY_COLUMNS

    ds = read_manifest(cfg.catalogue.queries, dict(cfg.storage.s3), required=QUERY_COLUMNS,
                       optional=OPTIONAL_QUERY_COLUMNS, what="queries")
    rows = ds.sort("query_id").take(cfg.report.num_queries)
    return pa.Table.from_pylist(rows)


def run_stage(cfg, stage: str, run_id: str, lines: list[str]) -> str:
    """One stage; returns its summary line."""
    import importlib

    if stage.startswith("train_"):
        from pipelines import train

        return train.run(cfg, stage.removeprefix("train_")).line()
    if stage == "rank":
        from pipelines import rank

        return rank.run(cfg, run_id).line()
    if stage == "report":
        from pipelines import report

        t = time.monotonic()
        path = report.write(cfg, run_id, lines, _sample_queries(cfg))
        return f"[report] page at {path} in {time.monotonic() - t:.1f}s"
    return importlib.import_module(f"pipelines.{stage}").run(cfg).line()


def run(cfg, stages: list[str] | None = None) -> dict:
    from pipelines.common import init_ray, prepare_models
    from pipelines.rank import new_run_id

    stages = list(stages or cfg.nightly.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise NightlyError(f"nightly.stages: unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    t0 = time.monotonic()
    state = _load_state(cfg)
    if state and state.get("status") == "running" and state.get("stages") == stages:
        print(f"[nightly] resuming run {state['run_id']} at stage "
              f"{next(s for s in stages if s not in state['done'])} ({', '.join(state['done']) or 'none'} done)")
    else:
        state = {"run_id": cfg.rank.run_id or new_run_id(), "stages": stages, "status": "running", "done": [],
                 "lines": [], "seconds": {}}
        _save_state(cfg, state)
    init_ray(cfg)
    if cfg.synthetic.enabled:
        fs, path = filesystem(cfg.catalogue.manifest, dict(cfg.storage.s3))
        if fs.get_file_info(path).type.name == "NotFound":
            from pipelines.synthetic import synth

            synth(cfg)
    prepare_models(cfg)
    for stage in stages:
        if stage in state["done"]:
            continue
        t = time.monotonic()
        line = run_stage(cfg, stage, state["run_id"], state["lines"])
        print(line, flush=True)
        state["done"].append(stage)
        state["lines"].append(line)
        state["seconds"][stage] = round(time.monotonic() - t, 1)
        _save_state(cfg, state)
    state["status"] = "finished"
    _save_state(cfg, state)
    print(f"[nightly] run {state['run_id']} done in {time.monotonic() - t0:.1f}s: "
          + ", ".join(f"{s} {state['seconds'].get(s, 0)}s" for s in stages), flush=True)
    return state
