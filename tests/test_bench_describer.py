"""bench/describer_split.py on a hand-made run folder: the queries split by whether the
describer's T~ is the target's own description, and each mode's recall on each part."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.describer_split import main, newest_runs
from pipelines.synthetic import Item

pytestmark = pytest.mark.fast

ITEMS = {"a": Item("circle", "red", "small", "left", "white"), "b": Item("square", "blue", "large", "right", "grey"),
         "c": Item("diamond", "green", "small", "centre", "black")}


def _rankings(path: str, mode: str, ranked: dict[str, list[str]], described: dict[str, str]) -> None:
    rows = [{"query_id": q, "rank": i + 1, "image_id": im, "description": described.get(q), "mode": mode}
            for q, ims in ranked.items() for i, im in enumerate(ims)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_queries_split_by_the_describers_exactness(tmp_path):
    run = tmp_path / "demo"
    os.makedirs(run / "catalogue" / "cirr" / "captions")
    pq.write_table(pa.Table.from_pylist([{"image_id": k, **vars(v)} for k, v in ITEMS.items()]),
                   run / "catalogue" / "manifest.parquet")
    # Query 0 targets a, query 1 targets b, query 2 targets c.
    with open(run / "catalogue" / "cirr" / "captions" / "cap.rc2.val.json", "w") as f:
        json.dump([{"pairid": i, "target_hard": t} for i, t in enumerate("abc")], f)
    described = {"0": ITEMS["a"].description(), "1": ITEMS["a"].description(), "2": ITEMS["c"].description()}
    day = run / "lake" / "rankings" / "run_date=2026-12-06"
    _rankings(str(day / "cirr-prior_only-20261206T000000Z.parquet"), "prior_only",
              {"0": ["b", "a"], "1": ["c", "b"], "2": ["c"]}, described)
    _rankings(str(day / "cirr-query_only-20261206T000000Z.parquet"), "query_only",
              {"0": ["c"], "1": ["c"], "2": ["c"]}, {})
    # An older run of a mode is not read; the before-fine-tuning run is not a mode.
    _rankings(str(day / "cirr-query_only-20261205T000000Z.parquet"), "query_only",
              {"0": ["a"], "1": ["b"], "2": ["c"]}, {})
    _rankings(str(day / "cirr-query_only-before-finetune-20261207T000000Z.parquet"), "query_only",
              {"0": ["a"]}, {})
    assert set(newest_runs(str(run / "lake" / "rankings"))) == {"prior_only", "query_only"}
    out = main(str(run))
    assert out["described_exactly"] == 2  # queries 0 and 2; query 1's T~ describes a, not b
    prior = out["modes"]["prior_only"]
    assert prior["T~ exact"] == {"queries": 2, "R@1": 50.0, "R@10": 100.0}
    assert prior["T~ wrong"] == {"queries": 1, "R@1": 0.0, "R@10": 100.0}
    assert out["modes"]["query_only"]["T~ exact"]["R@1"] == 50.0  # only query 2's target first
    assert out["modes"]["query_only"]["T~ wrong"]["R@10"] == 0.0  # b never ranked: a miss
