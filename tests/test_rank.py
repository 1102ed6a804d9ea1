"""The rank stage: search against brute force, the ANN index's recall, every run mode,
an s3:// lake (moto), idempotent reruns, rejects, refusals, and the results page in Chromium."""
from __future__ import annotations

import os
import shutil
import subprocess

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ops.search import RunningTopK
from tests.conftest import run_stage, tiny_config


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.fast
@pytest.mark.parametrize("samples", [1, 2])
def test_running_topk_over_blocks_equals_numpy_brute_force(samples):
    rng = np.random.default_rng(0)
    gallery, ids = _unit(rng, 1000, 32), np.array([f"g{i:04d}" for i in range(1000)], dtype=object)
    # 3 queries of `samples` vectors each: a query's score is its best sample's.
    queries = _unit(rng, 3 * samples, 32).reshape(3, samples, 32)
    exclude = ["g0007", None, "g0500"]
    topk = RunningTopK(queries, 10, exclude)
    for s in range(0, 1000, 97):  # blocks of uneven size, as lists and as Arrow arrays
        block = list(ids[s:s + 97])
        topk.add(block if s % 2 else pa.array(block), gallery[s:s + 97])
    got_ids, got_scores = topk.result()
    scores = np.einsum("bsd,gd->bsg", queries, gallery).max(axis=1)
    for i, ex in enumerate(exclude):
        if ex is not None:
            scores[i, int(ex[1:])] = -np.inf
    order = np.argsort(-scores, axis=1)[:, :10]
    assert (got_ids == ids[order]).all()
    np.testing.assert_allclose(got_scores, np.take_along_axis(scores, order, 1), rtol=1e-5)
    assert "g0007" not in got_ids[0] and "g0500" not in got_ids[2]


def _gallery_lake(tmp_path, tiny_models, n, d, rng, *extra):
    from ops.schemas import embeddings_schema, query_vectors_schema

    cfg = tiny_config(tmp_path, tiny_models, f"models.embedder.dim={d}", *extra)
    vec = _unit(rng, n, d)
    root = cfg.storage.root
    lance.write_dataset(pa.table({
        "image_id": [f"g{i:05d}" for i in range(n)], "kind": ["image"] * n, "sha256": ["x"] * n, "model": ["m"] * n,
        "text": pa.nulls(n, pa.string()), "caption_kind": pa.nulls(n, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), d)}, schema=embeddings_schema(d)),
        f"{root}/embeddings.lance")
    q = 50
    qv = _unit(rng, q, d)
    lance.write_dataset(pa.table({
        "query_id": [f"q{i}" for i in range(q)], "mode": ["query_only"] * q, "query_key": ["k"] * q,
        "reference_id": [f"g{i:05d}" for i in range(q)], "reference_uri": ["u"] * q, "reference_sha256": ["s"] * q,
        "modification_text": ["t"] * q, "shared_concept": pa.nulls(q, pa.string()), "description": ["d"] * q,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(qv.reshape(-1)), d)}, schema=query_vectors_schema(d)),
        f"{root}/query_vectors.lance")
    batch = pa.table({"query_id": [f"q{i}" for i in range(q)], "query_key": ["k"] * q,
                      "reference_id": [f"g{i:05d}" for i in range(q)], "reject_reason": pa.nulls(q, pa.string())})
    return cfg, batch


def test_ann_index_recall_at_10_against_exact(tmp_path, tiny_models):
    from ops.rank import GallerySearch
    from pipelines.config import plain
    from pipelines.lake import Lake

    cfg, batch = _gallery_lake(tmp_path, tiny_models, 4000, 64, np.random.default_rng(1), "index.min_rows=1000",
                               "rank.mode=query_only", "rank.top_k=10", "rank.gallery_block=512")
    assert "IVF_PQ index built" in run_stage(cfg, "index").line()
    lake = Lake.from_conf(cfg)
    exact = GallerySearch(plain(cfg), lake, "exact")(batch)
    ann = GallerySearch(plain(cfg), lake, "ann")(batch)
    hits = 0
    for qid in batch.column("query_id").to_pylist():
        e = set(np.array(exact.column("image_id"))[np.array(exact.column("query_id")) == qid])
        a = set(np.array(ann.column("image_id"))[np.array(ann.column("query_id")) == qid])
        assert len(e) == 10
        hits += len(e & a)
    recall = hits / (10 * batch.num_rows)
    assert recall >= 0.9, recall
    # Reference exclusion (CIRR's protocol): the query's reference never ranks, in both searches.
    refs = dict(zip(batch.column("query_id").to_pylist(), batch.column("reference_id").to_pylist()))
    for t in (exact, ann):
        assert not any(refs[q] == i for q, i in zip(t.column("query_id").to_pylist(), t.column("image_id").to_pylist()))
    # A second `index` run folds new rows into the existing index instead of rebuilding it.
    assert "index refreshed" in run_stage(cfg, "index").line()


@pytest.mark.parametrize("mode", ["full", "query_only", "prior_only", "joint", "text"])
def test_each_run_mode_gives_unit_query_vectors(tmp_path_factory, tiny_models, mode, checkpoints):
    from ops.rank import QueryOp
    from pipelines.config import plain
    from pipelines.synthetic import draw, random_item
    import random

    cfg = tiny_config(tmp_path_factory.mktemp("mode"), tiny_models, f"rank.mode={mode}")
    op = QueryOp(plain(cfg), None, {"prior": checkpoints[0], "adapter": checkpoints[1],
                                    "expected_prior": {"d_vl": 64, "cond_dim": 64}}, pa.schema([]))
    rng = random.Random(0)
    images = [draw(random_item(rng), 64, rng) for _ in range(3)]
    rows = [{"query_id": f"q{i}", "query_key": _key(f"q{i}"), "modification_text": t, "shared_concept": c}
            for i, (t, c) in enumerate([("make it red", "circle"), ("make it small", None), ("move it left", "square")])]
    v, desc = op.vectors(images, rows)
    assert v.shape == (3, 1, 64)
    norms = v.norm(dim=-1)
    if mode == "joint":  # w z_q + (1 - w) z(T~): not unit, its inner products are the joint score
        assert (norms <= 1 + 1e-5).all() and (norms > 0.1).all()
    else:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    assert (desc[0] is None) == (mode == "query_only")
    assert not torch.allclose(v[0], v[1])


@pytest.fixture(scope="module")
def s3_lake(tmp_path_factory, tiny_models, ray_local, s3_server, checkpoints):
    """The demo catalogue ingested, captioned and embedded into an s3:// lake, plus two bad queries."""
    from ops.storage import copy_dir
    from pipelines.synthetic import synth

    run_dir = tmp_path_factory.mktemp("ranklake")
    s3 = s3_server
    extra = ["storage.root=s3://lake/rank", f"storage.s3.endpoint={s3['endpoint']}",
             "storage.s3.access_key_id=testing", "storage.s3.secret_access_key=testing", "storage.s3.allow_http=true",
             f"catalogue.queries={run_dir}/queries.parquet", "synthetic.num_images=24", "synthetic.num_queries=6"]
    cfg = tiny_config(run_dir, tiny_models, *extra)
    synth(cfg)
    for stage in ("ingest", "caption", "embed"):
        run_stage(cfg, stage)
    copy_dir(checkpoints[0], cfg.train_stage1.output, dict(cfg.storage.s3))
    copy_dir(checkpoints[1], cfg.train_stage2.output, dict(cfg.storage.s3))
    queries = pq.read_table(f"{run_dir}/catalogue/queries.parquet").to_pylist()
    with open(f"{run_dir}/corrupt.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    queries += [{"query_id": "bad_missing", "reference_id": "img99999", "modification_text": "make it red",
                 "target_id": None, "shared_concept": None},
                {"query_id": "bad_corrupt", "reference_id": None, "modification_text": "make it red",
                 "target_id": None, "shared_concept": None}]
    table = pa.Table.from_pylist(queries).append_column(
        "reference_uri", pa.array([None] * (len(queries) - 1) + [f"{run_dir}/corrupt.png"], pa.string()))
    pq.write_table(table, f"{run_dir}/queries.parquet")
    return run_dir, extra


def test_rank_on_s3_is_idempotent_and_records_rejects(s3_lake, tiny_models):
    from pipelines.lake import Lake
    from ops.storage import filesystem

    run_dir, extra = s3_lake
    cfg = tiny_config(run_dir, tiny_models, *extra, "rank.run_id=r1", "rank.top_k=5")
    s = run_stage(cfg, "rank")
    assert (s.read, s.computed, s.reused, s.rejected, s.written, s.rows) == (8, 6, 0, 2, 6, 30)
    lake = Lake.from_conf(cfg)
    rejects = {r["key"]: r["reason"] for r in lake.open("rejects").to_table(filter="stage = 'rank'").to_pylist()}
    assert "not in the images table" in rejects["bad_missing"] and "corrupt image" in rejects["bad_corrupt"]
    first = lake.open("rankings").to_table(filter="run_id = 'r1'").sort_by([("query_id", "ascending"), ("rank", "ascending")])
    assert first.num_rows == 30 and set(first.column("rank").to_pylist()) == {1, 2, 3, 4, 5}
    assert all(first.column("prior_version").to_pylist()) and all(first.column("adapter_version").to_pylist())
    fs, path = filesystem(f"{cfg.storage.root}/rankings", dict(cfg.storage.s3))
    from pyarrow.fs import FileSelector

    files = [i.path for i in fs.get_file_info(FileSelector(path, recursive=True)) if i.path.endswith(".parquet")]
    assert len(files) == 1 and files[0].endswith("/r1.parquet") and "/run_date=" in files[0]
    # The same run_id again: the cached vectors are reused, its rows replaced, never duplicated.
    again = run_stage(cfg, "rank")
    assert (again.computed, again.reused, again.rows) == (0, 6, 30)
    second = lake.open("rankings").to_table(filter="run_id = 'r1'").sort_by([("query_id", "ascending"), ("rank", "ascending")])
    assert second.select(["query_id", "rank", "image_id", "score"]).equals(first.select(["query_id", "rank", "image_id", "score"]))
    assert len([i for i in fs.get_file_info(FileSelector(path, recursive=True)) if i.path.endswith(".parquet")]) == 1
    with fs.open_input_file(files[0]) as f:
        assert pq.read_table(f).num_rows == 30

    # A new run on unchanged inputs searches nothing: r1's rows stand under r2's id,
    # equal to what a search gives (r3, rank.reuse_unchanged=false).
    cols = ["query_id", "rank", "image_id", "score", "description", "config_hash"]

    def ranked(run_id):
        return lake.open("rankings").to_table(columns=cols, filter=f"run_id = '{run_id}'").sort_by(
            [("query_id", "ascending"), ("rank", "ascending")])

    r2 = run_stage(tiny_config(run_dir, tiny_models, *extra, "rank.run_id=r2", "rank.top_k=5"), "rank")
    assert (r2.reused_run, r2.written, r2.rows) == ("r1", 6, 30)
    r3 = run_stage(tiny_config(run_dir, tiny_models, *extra, "rank.run_id=r3", "rank.top_k=5",
                               "rank.reuse_unchanged=false"), "rank")
    assert r3.extra.get("reused_run") is None and r3.rows == 30
    assert ranked("r2").equals(ranked("r1")) and ranked("r3").equals(ranked("r1"))
    files = [i.path for i in fs.get_file_info(FileSelector(path, recursive=True)) if i.path.endswith(".parquet")]
    assert sorted(f.rsplit("/", 1)[1] for f in files) == ["r1.parquet", "r2.parquet", "r3.parquet"]
    # Another setting is another input: searched again.
    r4 = run_stage(tiny_config(run_dir, tiny_models, *extra, "rank.run_id=r4", "rank.top_k=4"), "rank")
    assert r4.extra.get("reused_run") is None and r4.rows == 24


def test_rank_refusals(s3_lake, tiny_models, tmp_path):
    from ops.rank import RankError
    from pipelines.lake import TableError

    run_dir, extra = s3_lake
    with pytest.raises(TableError, match="gallery's vectors have size 64 but models.embedder.dim is 32"):
        run_stage(tiny_config(run_dir, tiny_models, *extra, "models.embedder.dim=32"), "rank")
    pq.write_table(pa.table({"query_id": pa.array([], pa.string()), "modification_text": pa.array([], pa.string()),
                             "reference_id": pa.array([], pa.string())}), f"{tmp_path}/empty.parquet")
    with pytest.raises(RankError, match="queries table .*empty.parquet is empty"):
        run_stage(tiny_config(run_dir, tiny_models, *extra, f"catalogue.queries={tmp_path}/empty.parquet",
                              "rank.run_id=empty"), "rank")
    with pytest.raises(RankError, match="the gallery is empty"):
        run_stage(tiny_config(tmp_path, tiny_models), "rank")


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium (`make test` installs it; a test installs no system package)."""
    exe = shutil.which("chromium")
    assert exe, "chromium is missing: `make test` installs it (make browser)"
    return exe


def test_results_page_shows_modes_side_by_side_in_chromium(s3_lake, tiny_models, tmp_path, chromium):
    from PIL import Image

    from html import escape

    from pipelines import report
    from pipelines.context import RunContext

    run_dir, extra = s3_lake
    cfg = tiny_config(run_dir, tiny_models, *extra, f"report.dir={tmp_path}/report", "report.num_queries=20")
    run_stage(tiny_config(run_dir, tiny_models, *extra, "rank.mode=query_only", "rank.run_id=r2", "rank.top_k=5"),
              "rank")
    queries = pq.read_table(f"{run_dir}/queries.parquet")
    ctx = RunContext.create(cfg, "r1")
    ctx.lines.append("[rank] run r1: read 8 queries")
    page = report.write(ctx, queries, {"full": "r1", "query_only": "r2"})
    html = open(page).read()
    assert "[rank] run r1" in html and "<th>full: top 5</th><th>query_only: top 5</th>" in html
    assert "{'" not in html  # provenance as a table, not a Python dict
    # Beside each image, the captioner's caption of it (the captions table's words).
    captions = RunContext.create(cfg).lake.open("captions").to_table(columns=["caption_short"]).column(0)
    shown = [c for c in captions.to_pylist() if c and f"<br><i>{escape(c)}</i>" in html]
    assert len(shown) >= 8, len(shown)
    for words in ("Scores are cosine similarities", "<b>full</b>: Fusion-Diff", "<b>query_only</b>: the query",
                  "id=search", "</span> of 8 queries shown"):
        assert words in html, words
    # Natural order (q2 before q10; here the ids sort the same as text).
    order = [line.split("<td>")[1].split("<")[0] for line in html.split("<tr class=query")[1:]]
    assert order == sorted(order, key=report.natural_key) and order[:2] == ["bad_corrupt", "bad_missing"]
    assert html.count("(not ranked: see the rejects table)") == 2 * 2  # two rejected queries, two modes
    shot = f"{tmp_path}/shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1600,1400", f"file://{page}"], check=True, capture_output=True, timeout=120)
    im = np.asarray(Image.open(shot).convert("HSV"))
    coloured = ((im[..., 1] > 120) & (im[..., 2] > 80)).mean()  # saturated pixels: the drawn shapes
    # Text, rules and broken-image icons are grey; the thumbnails' shapes are saturated colours.
    assert coloured > 0.01, coloured
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"file://{page}"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="query"') == 8 and "function filterRows" in dom


@pytest.mark.fast
def test_natural_order_puts_q2_before_q10():
    from pipelines.report import natural_key

    assert sorted(["q10", "q2", "q1", "a", "q02b"], key=natural_key) == ["a", "q1", "q2", "q02b", "q10"]


def test_an_error_raised_inside_a_query_actor_reaches_the_cli_as_one_line(s3_lake, tiny_models, tmp_path, capsys):
    """A prior whose condition size is not the text encoder's passes the driver's check
    (its d_vl is the gallery's) and is refused by load_prior inside the Ray actor: the
    command line still prints one line and exits 2."""
    from model.prior import FusionDiffPrior
    from pipelines.__main__ import main
    from pipelines.config import plain
    from tests.conftest import tiny_overrides

    run_dir, extra = s3_lake
    cfg = tiny_config(run_dir, tiny_models, *extra)
    odd = f"{tmp_path}/odd_prior"
    FusionDiffPrior(d_vl=cfg.models.embedder.dim, cond_dim=32, **plain(cfg.prior)).save_pretrained(odd)
    capsys.readouterr()
    code = main(["rank", "--config", "conf/demo.yaml", *tiny_overrides(
        run_dir, tiny_models, *extra, "rank.mode=prior_only", f"train_stage1.output={odd}", "rank.run_id=odd")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: checkpoint ") and "cond_dim: expected 64, found 32" in err, err
    # One line for the refusal, one saying where Ray's full logs are; no traceback.
    lines = err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("full logs of every Ray process: ") and "Traceback" not in err


def _key(text: str) -> str:
    """A query key as ops/rank.py query_key makes them: a sha256 in hex."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


class _Images:
    """A TableReader holding an `images` table in memory (the ops' interface to the lake)."""

    s3 = None

    def __init__(self, rows):
        self.rows = {r["image_id"]: r for r in rows}

    def lookup(self, table, ids, columns, key="image_id", where=None):
        assert table == "images"
        return {i: self.rows[i] for i in ids if i in self.rows}

    def scan(self, *a, **k):
        return iter(())


@pytest.mark.fast
def test_every_row_of_a_repeated_query_id_is_rejected():
    from ops.rank import resolve

    tables = _Images([{"image_id": "a", "uri": "/a.png", "sha256": "s"}])
    batch = pa.table({"query_id": ["q1", "q2", "q2", ""], "modification_text": ["red", "blue", "green", "x"],
                      "reference_id": ["a", "a", "a", "a"]})
    rows = {(r["query_id"], r["modification_text"]): r for r in
            resolve(batch, tables, "query_only", {"v": 1}, duplicate_ids=frozenset({"q2"})).to_pylist()}
    assert rows[("q1", "red")]["reject_reason"] is None and rows[("q1", "red")]["reference_sha256"] == "s"
    assert rows[("q2", "blue")]["reject_reason"] == rows[("q2", "green")]["reject_reason"] == \
        "duplicate query_id in the queries table"
    assert rows[("", "x")]["reject_reason"] == "empty query_id"


def test_a_query_vector_does_not_depend_on_its_batch(tmp_path_factory, tiny_models, checkpoints):
    """Each query's noise comes from its own inputs: the same vector alone, in a batch of 8
    and in another batch of 8 (the query_vectors cache promises equal keys, equal vectors),
    and under another key (another model folder): runs differ by their models, not their noise."""
    import random

    from ops.rank import QueryOp
    from pipelines.config import plain
    from pipelines.synthetic import draw, random_item

    cfg = tiny_config(tmp_path_factory.mktemp("seed"), tiny_models, "rank.mode=full", "sampling.sampler=ddpm",
                      "sampling.num_steps=6")
    op = QueryOp(plain(cfg), None, {"prior": checkpoints[0], "adapter": checkpoints[1],
                                    "expected_prior": {"d_vl": 64, "cond_dim": 64}}, pa.schema([]))
    rng = random.Random(1)
    images = [draw(random_item(rng), 64, rng) for _ in range(15)]
    rows = [{"query_id": f"q{i}", "query_key": _key(f"q{i}"), "modification_text": f"make it shape {i % 3}",
             "shared_concept": None} for i in range(15)]
    alone = op.vectors(images[:1], rows[:1])[0][0]
    first = op.vectors(images[:8], rows[:8])[0][0]
    other = op.vectors([images[0]] + images[8:], [rows[0]] + rows[8:])[0][0]
    torch.testing.assert_close(first, alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(other, alone, atol=1e-4, rtol=0)
    # The same inputs under another key (the models moved to another folder): the same draw.
    moved = op.vectors(images[:1], [dict(rows[0], query_key=_key("another"))])[0][0]
    torch.testing.assert_close(moved, alone, atol=1e-4, rtol=0)
    # The noise is the query's own: other reference bytes (the same pixels here) draw other noise.
    other_bytes = op.vectors(images[:1], [dict(rows[0], reference_sha256="0" * 64)])[0][0]
    assert (other_bytes - alone).abs().max() > 1e-2


def test_query_actors_fetch_their_own_checkpoint_copies(s3_lake, tiny_models):
    """The rank stage hands the actors the checkpoints' URIs (here s3://), never a path
    that exists only on the driver; each actor copies them into a folder of its own."""
    from ops.rank import QueryOp
    from pipelines.context import RunContext
    from pipelines.rank import checkpoint_uris

    run_dir, extra = s3_lake
    ctx = RunContext.create(tiny_config(run_dir, tiny_models, *extra, "rank.mode=full"))
    uris = checkpoint_uris(ctx, {"prior", "adapter"})
    assert uris["prior"] == ctx.cfg.train_stage1.output and uris["prior"].startswith("s3://")
    assert uris["adapter"] == ctx.cfg.train_stage2.output and uris["adapter"].startswith("s3://")
    op = QueryOp(ctx.conf, ctx.lake, uris, pa.schema([]))
    assert op.prior is not None and op.adapter is not None
    copies = os.listdir(op._cache)
    assert sorted(copies) == ["adapter", "prior"]


def test_batched_index_search_equals_one_vector_at_a_time(tmp_path, tiny_models):
    from pipelines.lake import Lake

    rng = np.random.default_rng(2)
    cfg, _ = _gallery_lake(tmp_path, tiny_models, 1500, 32, rng, "index.min_rows=1000")
    run_stage(cfg, "index")
    lake, vectors = Lake.from_conf(cfg), _unit(rng, 7, 32)
    args = (11, "kind = 'image'", cfg.index.nprobes, cfg.index.refine_factor)
    together = lake.nearest("embeddings", vectors, *args)
    alone = [lake.nearest("embeddings", v[None], *args)[0] for v in vectors]
    assert [[i for i, _ in h] for h in together] == [[i for i, _ in h] for h in alone]
    assert all(len(h) == 11 and h == sorted(h, key=lambda x: -x[1]) for h in together)


def _staged(tmp_path, name: str, n: int, tag: str):
    from ops.rank import RESULT_SCHEMA

    t = pa.table({"query_id": [f"q{i}" for i in range(n)], "rank": [1] * n, "image_id": [f"{tag}{i}" for i in range(n)],
                  "score": [0.5] * n, "description": [None] * n}, schema=RESULT_SCHEMA)
    return lance.write_dataset(t, str(tmp_path / f"{name}.lance"))


def _provenance(run_id: str) -> dict:
    return {"run_id": run_id, "run_date": "2026-11-24", "mode": "query_only", "prior_version": None,
            "adapter_version": None, "embedder": "e", "config_hash": "h"}


@pytest.mark.fast
def test_publish_appends_a_run_replaces_a_rerun_and_retention_drops_the_oldest(tmp_path):
    from pipelines.config import load_config
    from pipelines.lake import Lake
    from pipelines.rank import expire_runs, publish, rankings_parquet_uri

    lake = Lake.from_conf(load_config("conf/demo.yaml", [f"run_dir={tmp_path}"]))
    for i, run in enumerate(("r1", "r2", "r3")):
        publish(lake, _staged(tmp_path, run, 3, run), _provenance(run))
        # Written in this order: r1 is the oldest.
        os.utime(rankings_parquet_uri(lake, "2026-11-24", run), (1_000_000 + i, 1_000_000 + i))
    assert lake.open("rankings").count_rows() == 9
    assert any("run_id" in ix.field_names for ix in lake.open("rankings").describe_indices())
    # A rerun of r2 with other rows replaces r2's rows, and only those.
    publish(lake, _staged(tmp_path, "r2b", 2, "new"), _provenance("r2"))
    os.utime(rankings_parquet_uri(lake, "2026-11-24", "r2"), (1_000_001, 1_000_001))
    rows = lake.open("rankings").to_table(columns=["run_id", "image_id"]).to_pylist()
    assert sorted(r["image_id"] for r in rows if r["run_id"] == "r2") == ["new0", "new1"]
    assert len(rows) == 8
    assert pq.read_table(rankings_parquet_uri(lake, "2026-11-24", "r2")).num_rows == 2
    # Keep 2 runs: r1 (the oldest) goes from the table and its Parquet object is deleted.
    assert expire_runs(lake, 0) == []
    assert expire_runs(lake, 2) == ["r1"]
    assert {r["run_id"] for r in lake.open("rankings").to_table(columns=["run_id"]).to_pylist()} == {"r2", "r3"}
    assert not os.path.exists(rankings_parquet_uri(lake, "2026-11-24", "r1"))
    assert os.path.exists(rankings_parquet_uri(lake, "2026-11-24", "r3"))


@pytest.mark.fast
def test_a_query_key_changes_with_what_the_describer_sees_and_writes(tmp_path, tiny_models):
    """Rank's keys name the describer as the triplets' `describer` column does (one
    describer_id), plus the concept template only rank uses: a change of what the
    describer sees or writes with re-describes every query, an unchanged config none."""
    from ops.rank import describer_id
    from pipelines.config import plain
    from pipelines.context import RunContext
    from pipelines.rank import model_versions

    def versions(*extra):
        cfg = tiny_config(tmp_path, tiny_models, "rank.mode=joint", *extra)
        return cfg, model_versions(RunContext.create(cfg), {"describer"})

    cfg, base = versions()
    assert versions()[1] == base
    assert base["describer"] == describer_id(plain(cfg.models.describer), plain(cfg.rank))
    for change in ("rank.describe_max_new_tokens=17", "models.describer.image_max_pixels=4096",
                   "rank.describe_template_no_concept='Describe {modification}.'",
                   "rank.describe_template='Describe {modification} keeping {shared_concept}.'"):
        assert versions(change)[1] != base, change
