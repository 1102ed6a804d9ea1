"""`python -m pipelines nightly`: the stages of `nightly.stages`, in order, as one run.

Each stage is incremental on its own (unchanged images run no model; cached query
vectors are reused; a rank whose inputs are the last run's searches nothing and
republishes that run's rows: rank.reuse_unchanged), so a nightly run on an unchanged
catalogue is cheap and writes the same rankings under a new run_id. The run's state
(its run_id, the stages done and their summaries) is kept at
<storage.root>/_nightly/state.json: a run killed in the middle is resumed by the next
invocation at the stage it was in, with the same run_id.
"""
from __future__ import annotations

import json
import time

from ops.storage import filesystem, read_json, write_bytes
from pipelines.common import check_inputs
from pipelines.context import RunContext, Summary, new_run_id
from pipelines.registry import STAGES


def _state_uri(cfg) -> str:
    return f"{cfg.storage.root.rstrip('/')}/_nightly/state.json"


def load_state(cfg) -> dict | None:
    return read_json(_state_uri(cfg), dict(cfg.storage.s3))


def _save_state(cfg, state: dict) -> None:
    write_bytes(_state_uri(cfg), json.dumps(state, indent=1).encode(), dict(cfg.storage.s3))


def run(cfg, stages: list[str] | None = None, dry_run: bool = False) -> dict:
    """Runs `stages` (nightly.stages by default; the config's rules checked the names)
    and returns the run's state: run_id, status, done, summaries, seconds. A dry run
    asks each stage what it would do and keeps no state."""
    stages = list(stages or cfg.nightly.stages)
    t0 = time.monotonic()
    if dry_run:
        ctx = RunContext.create(cfg, dry_run=True)
        summaries = {s: STAGES[s].run(ctx) for s in stages}
        for s in summaries.values():
            print(s.line(), flush=True)
        return {"run_id": ctx.run_id, "stages": stages, "status": "dry run", "done": [],
                "summaries": {k: v.to_dict() for k, v in summaries.items()}}
    state = load_state(cfg)
    if state and state.get("status") == "running" and state.get("stages") == stages:
        print(
            f"[nightly] resuming run {state['run_id']} at stage "
            f"{next(s for s in stages if s not in state['done'])} ({', '.join(state['done']) or 'none'} done)"
        )
    else:
        state = {
            "run_id": cfg.rank.run_id or new_run_id(),
            "stages": stages,
            "status": "running",
            "done": [],
            "summaries": {},
            "seconds": {},
        }
        _save_state(cfg, state)
    ctx = RunContext.create(cfg, state["run_id"])
    ctx.lines.extend(Summary.from_dict(d).line() for d in state["summaries"].values())
    ctx.start_ray()
    if cfg.synthetic.enabled:
        fs, path = filesystem(cfg.catalogue.manifest, dict(cfg.storage.s3))
        if fs.get_file_info(path).type.name == "NotFound":
            print(STAGES["synth"].run(ctx).line(), flush=True)
    # A missing input or checkpoint is refused before the night's first stage, not after
    # the stages before the one that reads it.
    check_inputs(cfg, [s for s in stages if s not in state["done"]])
    for stage in stages:
        if stage in state["done"]:
            continue
        summary = STAGES[stage].run(ctx)
        print(summary.line(), flush=True)
        ctx.lines.append(summary.line())
        state["done"].append(stage)
        state["summaries"][stage] = summary.to_dict()
        state["seconds"][stage] = summary.seconds
        _save_state(cfg, state)
    state["status"] = "finished"
    _save_state(cfg, state)
    print(
        f"[nightly] run {state['run_id']} done in {time.monotonic() - t0:.1f}s: "
        + ", ".join(f"{s} {state['seconds'].get(s, 0)}s" for s in stages),
        flush=True,
    )
    return state
