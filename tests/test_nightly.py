"""The nightly DAG: a killed run resumes at its stage, an unchanged catalogue runs no
model over images and gives the same rankings, added images are the only ones processed."""
from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import tiny_config


def _rankings(cfg, run_id):
    from pipelines.lake import Lake

    t = Lake.from_conf(cfg).open("rankings").to_table(filter=f"run_id = '{run_id}'")
    return t.select(["query_id", "rank", "image_id", "score"]).sort_by([("query_id", "ascending"), ("rank", "ascending")])


def test_nightly_resumes_is_incremental_and_refreshes(tmp_path, tiny_models, ray_local, monkeypatch, capsys):
    from pipelines import nightly, rank
    from pipelines.synthetic import draw, png, random_item, synth
    from ops.storage import write_bytes

    cfg = tiny_config(tmp_path, tiny_models, "synthetic.num_images=12", "synthetic.num_queries=4",
                      "synthetic.num_triplets=2", "rank.mode=query_only", "rank.top_k=5",
                      "nightly.stages=[ingest,caption,embed,index,rank]")
    synth(cfg)

    # 1. Killed in the rank stage, after the query vectors and before the rankings are published.
    def crash(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(rank, "publish", crash)
    with pytest.raises(RuntimeError, match="killed"):
        nightly.run(cfg)
    state = nightly.load_state(cfg)
    assert state["status"] == "running" and state["done"] == ["ingest", "caption", "embed", "index"]
    assert not (tmp_path / "lake" / "rankings.lance").exists()  # no partial partition, no partial table
    monkeypatch.undo()

    # 2. The next invocation resumes that run at rank, with the same run_id.
    capsys.readouterr()
    resumed = nightly.run(cfg)
    out = capsys.readouterr().out
    assert resumed["run_id"] == state["run_id"] and f"resuming run {state['run_id']} at stage rank" in out
    assert "[ingest]" not in out and "computed 0, reused 4" in out  # the crashed run's vectors were kept
    first = _rankings(cfg, state["run_id"])
    assert first.num_rows == 4 * 5

    # 3. Unchanged catalogue: no image reaches a model, the same rankings under a new run_id.
    second = nightly.run(cfg)
    done = second["summaries"]
    assert second["run_id"] != state["run_id"]
    assert (done["caption"]["read"], done["caption"]["written"], done["caption"]["skipped"]) == (12, 0, 12)
    assert (done["embed"]["read"], done["embed"]["written"], done["embed"]["skipped"]) == (12, 0, 12)
    assert (done["rank"]["extra"]["computed"], done["rank"]["extra"]["reused"]) == (0, 4)
    assert _rankings(cfg, second["run_id"]).equals(first)

    # 4. Two images added: only they are captioned and embedded; the rankings are refreshed.
    rng = random.Random(7)
    manifest = pq.read_table(cfg.catalogue.manifest).to_pylist()
    for n in range(2):
        uri = f"{tmp_path}/catalogue/images/new{n}.png"
        write_bytes(uri, png(draw(random_item(rng), cfg.synthetic.image_size, rng)), None)
        manifest.append({**manifest[0], "image_id": f"new{n}", "uri": uri, "caption": None})
    pq.write_table(pa.Table.from_pylist(manifest), cfg.catalogue.manifest)
    third = nightly.run(cfg)
    done = third["summaries"]
    assert (done["caption"]["read"], done["caption"]["written"], done["caption"]["skipped"]) == (14, 2, 12)
    assert (done["embed"]["read"], done["embed"]["written"], done["embed"]["skipped"]) == (14, 2, 12)
    refreshed = _rankings(cfg, third["run_id"])
    assert refreshed.num_rows == 4 * 5
    assert nightly.load_state(cfg)["status"] == "finished"
    assert nightly.load_state(cfg)["summaries"]["caption"]["written"] == 2  # the state keeps each Summary

    # The Python API: the same stages and tables, the same errors.
    from pipelines import api

    newest = api.read_rankings(cfg)
    assert newest.select(["query_id", "rank", "image_id", "score"]).equals(refreshed)
    assert api.run_stage("index", cfg).note.startswith("no index")
    with pytest.raises(api.PipelineError, match="no rankings of run 'nope'"):
        api.read_rankings(cfg, "nope")

    # 5. The same catalogue in CIRR's layout (written by synth) evaluates the run's Parquet
    # rankings (what `benchmark` does for each mode; `make demo` runs the command itself).
    from pipelines import benchmark, evaluate

    b = evaluate.load("cirr", f"{tmp_path}/catalogue/cirr", "val", f"{tmp_path}/catalogue")
    assert {g["image_id"] for g in b.gallery} == {m["image_id"] for m in manifest[:12]}
    parquet = next((tmp_path / "lake" / "rankings").glob(f"run_date=*/{third['run_id']}.parquet"))
    # The catalogue's query q0000n is CIRR pairid n.
    rankings = {str(int(q[1:])): r for q, r in evaluate.read_rankings(str(parquet)).items()}
    # The file holds each query's top 5 of an 11-image gallery (reference removed): R@10
    # and R@50 would count the rest as misses, so they are refused; R@1 and R@5 are exact.
    with pytest.raises(evaluate.MetricsError, match="R@50 needs each query's top 11, but the ranking of query"):
        evaluate.evaluate(b, rankings)
    targets = {q: t["target"] for q, t in b.truth.items()}
    r = evaluate.recall_at(rankings, targets, (1, 5), evaluate.pools(b))
    assert 0 <= r[1] <= r[5] <= 100
    metrics = {"R@1": r[1], "R@5": r[5]}
    table = benchmark.markdown("cirr", "val", {"query_only": metrics}).splitlines()
    assert table[0] == "| cirr val | R@1 | R@5 |"
