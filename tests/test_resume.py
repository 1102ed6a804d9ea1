"""A stage killed mid-write keeps what it committed (`<stage>.commit_every` rows at a
time) and its rerun redoes at most that interval: pipelines/common.py write_staging,
resume_staged and select_work on real Ray Data and Lance."""
import gc
import time

import pyarrow as pa
import pytest

from pipelines.common import StageOutput, select_work, stage_and_commit
from pipelines.config import load_config
from pipelines.context import RunContext, Summary

SCHEMA = pa.schema([("image_id", pa.string()), ("sha256", pa.string())])
STAGED = SCHEMA.append(pa.field("reject_reason", pa.string()))
ROWS = 20
FAIL_FROM = 12  # the first run dies at this row
EVERY = 4


def made(batch: pa.Table, fail_from: int | None) -> pa.Table:
    """The stage's work on a batch; in the first run it dies at row FAIL_FROM, after a
    pause that lets the batches made before it reach the writer."""
    ids = batch.column("image_id").to_pylist()
    if fail_from is not None and any(int(i[3:]) >= fail_from for i in ids):
        time.sleep(2)
        raise RuntimeError("killed")
    return pa.table({"image_id": ids, "sha256": [f"h{i}" for i in ids], "reject_reason": pa.nulls(len(ids))},
                    schema=STAGED)


def catalogue(ray):
    return ray.data.from_items([{"image_id": f"img{i:02d}"} for i in range(ROWS)], override_num_blocks=ROWS)


def test_a_killed_stage_resumes_from_its_last_commit(tmp_path, ray_local):
    cfg = load_config("conf/demo.yaml", [f"run_dir={tmp_path}", f"ingest.commit_every={EVERY}"])
    ctx = RunContext.create(cfg)
    out = StageOutput("ingest", STAGED, "images_test", ("image_id",), SCHEMA)
    first = catalogue(ray_local).map_batches(made, batch_format="pyarrow", batch_size=2,
                                             fn_kwargs={"fail_from": FAIL_FROM}, concurrency=1)
    with pytest.raises(Exception, match="killed"):
        stage_and_commit(first, ctx, out)
    kept = ctx.lake.open_staging("ingest").count_rows()
    assert kept % EVERY == 0 and FAIL_FROM - kept <= EVERY, kept  # whole commits, at most one interval lost

    summary = Summary("ingest")
    hashed = catalogue(ray_local).map_batches(made, batch_format="pyarrow", batch_size=2,
                                              fn_kwargs={"fail_from": None})
    todo = select_work(ctx, summary, hashed, out, table="images_test", compare={"sha256": "sha256"})
    assert summary.resumed == kept
    redone = todo.count()
    assert redone == ROWS - kept and redone - (ROWS - FAIL_FROM) <= EVERY
    counts = stage_and_commit(todo, ctx, out)
    table = ctx.lake.open("images_test").to_table()
    assert counts["written"] == ROWS - kept and table.num_rows == ROWS
    assert sorted(table.column("image_id").to_pylist()) == [f"img{i:02d}" for i in range(ROWS)]
    assert ctx.lake.open_staging("ingest") is None


class DiesAtRow:
    """A model op (constructed as map_with_model constructs one) that dies at FAIL_FROM."""

    def __init__(self, conf, lake):
        pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        return made(batch, FAIL_FROM)


def test_a_table_read_as_one_block_still_commits_as_it_goes(tmp_path, ray_local):
    """A Lance table is read a fragment's batch at a time, so a small table is one block;
    a map's output leaves its worker only when its block is done. map_with_model cuts
    the input into blocks of the stage's batch size, so the staging is still committed
    every commit_every rows and the kill keeps them."""
    from pipelines.common import map_with_model

    cfg = load_config("conf/demo.yaml", [f"run_dir={tmp_path}", f"caption.commit_every={EVERY}",
                                         "caption.batch_size=2", "caption.num_actors=1"])
    ctx = RunContext.create(cfg)
    out = StageOutput("caption", STAGED, "images_test", ("image_id",), SCHEMA)
    one_block = ray_local.data.from_items([{"image_id": f"img{i:02d}"} for i in range(ROWS)],
                                          override_num_blocks=1)
    with pytest.raises(Exception, match="killed"):
        stage_and_commit(map_with_model(one_block, ctx, DiesAtRow, "caption"), ctx, out)
    kept = ctx.lake.open_staging("caption").count_rows()
    assert kept % EVERY == 0 and FAIL_FROM - kept <= EVERY, kept
    # The failed write's actor goes with its execution: left holding its CPU in this
    # session's 2-CPU Ray, the next test's read tasks would wait for it forever.
    gc.collect()
    deadline = time.monotonic() + 60
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "the failed stage's actor still holds a CPU after 60 s"
        time.sleep(0.5)
