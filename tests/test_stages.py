"""ingest, caption and embed on local Ray into Lance: counts, incrementality, rejects."""
import random

import lance
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ops.embed import EmbeddingSizeError
from pipelines.common import ManifestError
from pipelines.synthetic import Item, draw, make_catalogue, png
from tests.badfiles import write_bad_files
from tests.conftest import run_stage, tiny_config as make_config


def run_all(cfg):
    return [run_stage(cfg, stage) for stage in ("ingest", "caption", "embed")]


def rows(cfg, table, **kw):
    return lance.dataset(f"{cfg.storage.root}/{table}.lance").to_table(**kw)


@pytest.fixture(scope="module")
def lake(tmp_path_factory, tiny_models, ray_local):
    """A catalogue of 8 good images plus one row of each bad kind, after a first full run."""
    root = tmp_path_factory.mktemp("run")
    uris = make_catalogue(str(root / "catalogue"), num_images=8, image_size=64, num_triplets=1, num_queries=2, seed=3)
    bad = write_bad_files(root / "bad")
    m = pq.read_table(uris["manifest"]).select(["image_id", "uri", "caption"]).to_pylist()
    m += [{"image_id": f"bad_{k.split('.')[0]}", "uri": v, "caption": None} for k, v in bad.items()]
    m += [{"image_id": "bad_missing", "uri": str(root / "nope.png"), "caption": None},
          {"image_id": "", "uri": m[0]["uri"], "caption": None},
          {"image_id": "twice", "uri": m[1]["uri"], "caption": None},
          {"image_id": "twice", "uri": m[2]["uri"], "caption": None}]
    pq.write_table(pa.Table.from_pylist(m), root / "manifest.parquet")
    cfg = make_config(root, tiny_models, f"catalogue.manifest={root}/manifest.parquet")
    first = run_all(cfg)
    return {"cfg": cfg, "root": root, "manifest": m, "first": first}


def test_first_run_writes_every_good_row_and_rejects_every_bad_one(lake):
    cfg = lake["cfg"]
    ing, cap, emb = lake["first"]
    assert (ing.read, ing.written, ing.rejected) == (17, 8, 9)
    assert (cap.read, cap.written, cap.rejected) == (8, 8, 0)
    assert (emb.read, emb.written, emb.rejected) == (8, 8, 0)
    images = rows(cfg, "images")
    assert images.num_rows == 8 and set(images["image_id"].to_pylist()) == {f"img{i:05d}" for i in range(8)}
    assert all(len(s) == 64 for s in images["sha256"].to_pylist())
    rejects = {r["key"]: r["reason"] for r in rows(cfg, "rejects").to_pylist() if r["stage"] == "ingest"}
    assert "not an image" in rejects["bad_notes"] and "corrupt" in rejects["bad_truncated"]
    assert "too small" in rejects["bad_pixel"] and "too large" in rejects["bad_huge"]
    assert "missing file" in rejects["bad_missing"] and "empty image_id" in rejects["<empty image_id>"]
    assert "duplicate" in rejects["twice"] and "empty" in rejects["bad_empty"]
    emb_t = rows(cfg, "embeddings")
    assert emb_t.schema.field("vector").type == pa.list_(pa.float32(), cfg.models.embedder.dim)
    assert sorted(emb_t["kind"].to_pylist()) == ["image"] * 8 + ["pair"] * 8
    captions = {r["image_id"]: r for r in rows(cfg, "captions").to_pylist()}
    pairs = {r["image_id"]: r for r in emb_t.to_pylist() if r["kind"] == "pair"}
    for image_id, p in pairs.items():
        assert p["text"] == captions[image_id][f"caption_{p['caption_kind']}"]


def test_rerun_on_unchanged_catalogue_processes_nothing(lake):
    cfg = lake["cfg"]
    before = {t: rows(cfg, t).to_pylist() for t in ("images", "captions", "embeddings")}
    ing, cap, emb = run_all(cfg)
    assert (ing.written, ing.skipped, ing.rejected) == (0, 8, 9)
    assert (cap.written, cap.skipped) == (0, 8) and (emb.written, emb.skipped) == (0, 8)
    for t, old in before.items():
        assert rows(cfg, t).to_pylist() == old, t
    assert rows(cfg, "rejects").num_rows == 9 - 1  # the two rows of "twice" share one key


def test_changed_bytes_reprocess_exactly_that_image_and_new_images_only_themselves(lake):
    cfg, root = lake["cfg"], lake["root"]
    changed = lake["manifest"][0]
    old_caps = {r["image_id"]: r for r in rows(cfg, "captions").to_pylist()}
    old_vecs = {(r["image_id"], r["kind"]): r["vector"] for r in rows(cfg, "embeddings").to_pylist()}
    with open(changed["uri"], "wb") as f:
        f.write(png(draw(Item("circle", "orange", "large", "left", "black"), 64, random.Random(9))))
    ing, cap, emb = run_all(cfg)
    assert (ing.written, cap.written, emb.written) == (1, 1, 1)
    caps = {r["image_id"]: r for r in rows(cfg, "captions").to_pylist()}
    assert caps[changed["image_id"]]["sha256"] != old_caps[changed["image_id"]]["sha256"]
    assert all(caps[k] == v for k, v in old_caps.items() if k != changed["image_id"])
    vecs = {(r["image_id"], r["kind"]): r["vector"] for r in rows(cfg, "embeddings").to_pylist()}
    assert vecs[(changed["image_id"], "image")] != old_vecs[(changed["image_id"], "image")]
    assert all(vecs[k] == v for k, v in old_vecs.items() if k[0] != changed["image_id"])

    extra = make_catalogue(str(root / "more"), num_images=2, image_size=64, num_triplets=0, num_queries=1, seed=11)
    new = [dict(r, image_id="new_" + r["image_id"]) for r in pq.read_table(extra["manifest"]).select(["image_id", "uri", "caption"]).to_pylist()]
    pq.write_table(pa.Table.from_pylist(lake["manifest"] + new), root / "manifest.parquet")
    ing, cap, emb = run_all(cfg)
    assert (ing.read, ing.written, ing.skipped) == (19, 2, 8)
    assert (cap.written, cap.skipped, emb.written, emb.skipped) == (2, 8, 2, 8)
    assert rows(cfg, "embeddings").num_rows == 20
    assert rows(cfg, "images").num_rows == len(set(rows(cfg, "images")["image_id"].to_pylist())) == 10


def test_csv_manifest_keeps_ids_as_strings(lake, tmp_path, tiny_models):
    src = lake["manifest"][:3]
    t = pa.table({"image_id": ["007", "008", "009"], "uri": [r["uri"] for r in src]})
    pacsv.write_csv(t, tmp_path / "m.csv")
    cfg = make_config(tmp_path, tiny_models, f"catalogue.manifest={tmp_path}/m.csv")
    s = run_stage(cfg, "ingest")
    assert s.written == 3 and sorted(rows(cfg, "images")["image_id"].to_pylist()) == ["007", "008", "009"]


def test_manifest_without_a_required_column_is_refused_by_name(tmp_path, tiny_models, ray_local):
    pq.write_table(pa.table({"image_id": ["a"], "path": ["/x.png"]}), tmp_path / "m.parquet")
    cfg = make_config(tmp_path, tiny_models, f"catalogue.manifest={tmp_path}/m.parquet")
    with pytest.raises(ManifestError, match="no column 'uri'"):
        run_stage(cfg, "ingest")
    cfg = make_config(tmp_path, tiny_models, f"catalogue.manifest={tmp_path}/none.parquet")
    with pytest.raises(ManifestError, match="does not exist"):
        run_stage(cfg, "ingest")


def test_embeddings_of_another_size_are_refused_before_work(lake, tiny_models):
    cfg = make_config(lake["root"], tiny_models, f"catalogue.manifest={lake['root']}/manifest.parquet",
                      "models.embedder.dim=1536")
    with pytest.raises(EmbeddingSizeError, match="size 64.*dim is 1536"):
        run_stage(cfg, "embed")


def test_crash_before_commit_loses_and_duplicates_nothing(lake, monkeypatch):
    """A stage killed after its Ray work but before its commit leaves the tables as they
    were; the rerun commits the staged row instead of captioning it again."""
    cfg = lake["cfg"]
    target = lake["manifest"][1]
    with open(target["uri"], "wb") as f:
        f.write(png(draw(Item("triangle", "purple", "small", "right", "grey"), 64, random.Random(4))))
    assert run_stage(cfg, "ingest").written == 1
    before = rows(cfg, "captions").to_pylist()

    def killed(*a, **k):
        raise RuntimeError("killed before commit")

    import pipelines.lake

    monkeypatch.setattr(pipelines.lake, "commit", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(cfg, "caption")
    assert rows(cfg, "captions").to_pylist() == before
    monkeypatch.undo()
    again = run_stage(cfg, "caption")
    assert (again.resumed, again.written, again.rejected) == (1, 0, 0)
    ids = rows(cfg, "captions")["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == rows(cfg, "images").num_rows
    assert run_stage(cfg, "embed").written == 1
    keys = [(r["image_id"], r["kind"]) for r in rows(cfg, "embeddings", columns=["image_id", "kind"]).to_pylist()]
    assert len(keys) == len(set(keys)) == 2 * len(ids)


def test_duplicate_ids_counted_locally_and_by_the_shuffle_agree(ray_local):
    from pipelines.common import duplicate_ids

    ids = ["a", "b", "a", "c", "", "", "d", "c", "c"]
    ds = ray_local.data.from_items([{"image_id": i} for i in ids])
    local = duplicate_ids(ds, "image_id", 2, len(ids), local_max_rows=100)
    shuffled = duplicate_ids(ds, "image_id", 2, len(ids), local_max_rows=0)
    assert local == shuffled == frozenset({"a", "c"})  # empty ids are rejected on their own


def test_dry_run_counts_the_work_and_writes_nothing(tmp_path, tiny_models, ray_local):
    uris = make_catalogue(str(tmp_path / "cat"), num_images=5, image_size=64, num_triplets=0, num_queries=1, seed=8)
    m = pq.read_table(uris["manifest"]).select(["image_id", "uri", "caption"]).to_pylist()
    pq.write_table(pa.Table.from_pylist(m[:4]), tmp_path / "manifest.parquet")
    cfg = make_config(tmp_path, tiny_models, f"catalogue.manifest={tmp_path}/manifest.parquet")
    for stage in ("ingest", "caption"):
        run_stage(cfg, stage)
    with open(m[0]["uri"], "wb") as f:  # one changed, one new, one broken
        f.write(png(draw(Item("circle", "orange", "large", "left", "black"), 64, random.Random(2))))
    pq.write_table(pa.Table.from_pylist(m + [{"image_id": "broken", "uri": str(tmp_path / "no.png"), "caption": None}]),
                   tmp_path / "manifest.parquet")
    versions = {t: lance.dataset(f"{cfg.storage.root}/{t}.lance").version for t in ("images", "captions")}
    s = run_stage(cfg, "ingest", dry_run=True)
    # Counted from the stamps, so no image is read: the broken row counts as new (read, then rejected).
    assert (s.read, s.new, s.changed, s.unchanged, s.rejected, s.written) == (6, 2, 1, 3, 0, 0)
    assert "dry run" in s.line()
    c = run_stage(cfg, "caption", dry_run=True)  # the images table is as ingest last wrote it
    assert (c.read, c.new, c.changed, c.unchanged, c.written) == (4, 0, 0, 4, 0)
    assert {t: lance.dataset(f"{cfg.storage.root}/{t}.lance").version for t in versions} == versions
    assert run_stage(cfg, "ingest").written == 2  # the real run does what the dry run said
    assert run_stage(cfg, "caption", dry_run=True).new == 1


def test_images_gone_from_the_manifest_leave_every_table_and_fixed_rejects_clear(lake):
    """Runs last on the module's lake: two images leave the manifest, a missing file
    appears; then a truncated manifest is refused with nothing deleted."""
    from pipelines.lake import TableError

    cfg, root = lake["cfg"], lake["root"]
    manifest = pq.read_table(root / "manifest.parquet").to_pylist()
    gone = {"img00006", "img00007"}
    kept = [r for r in manifest if r["image_id"] not in gone]
    # The row rejected as a missing file now has its file.
    missing = next(r for r in kept if r["image_id"] == "bad_missing")
    with open(missing["uri"], "wb") as f:
        f.write(png(draw(Item("square", "green", "small", "right", "white"), 64, random.Random(5))))
    pq.write_table(pa.Table.from_pylist(kept), root / "manifest.parquet")
    images_before = rows(cfg, "images").num_rows

    dry = run_stage(cfg, "ingest", dry_run=True)
    assert dry.deleted == 2 and rows(cfg, "images").num_rows == images_before

    ing, cap, emb = run_all(cfg)
    assert ing.deleted == 2 and ing.deleted_captions == 2 and ing.deleted_embeddings == 4
    assert "deleted 2" in ing.line()
    for table in ("images", "captions", "embeddings"):
        ids = set(rows(cfg, table)["image_id"].to_pylist())
        assert not ids & gone, table
        assert "bad_missing" in ids, table  # ingested, captioned and embedded now
    rejects = {r["key"] for r in rows(cfg, "rejects").to_pylist() if r["stage"] == "ingest"}
    assert "bad_missing" not in rejects and "bad_notes" in rejects

    # A manifest of 1 row would delete most of the catalogue: refused, nothing deleted.
    pq.write_table(pa.Table.from_pylist(kept[:1]), root / "manifest.parquet")
    before = rows(cfg, "images").num_rows
    with pytest.raises(TableError, match="more than ingest.max_delete_fraction=0.5; nothing was deleted"):
        run_stage(cfg, "ingest")
    assert rows(cfg, "images").num_rows == before
    pq.write_table(pa.Table.from_pylist(manifest), root / "manifest.parquet")


def test_model_ops_on_actors_write_what_kept_ops_in_tasks_write(tmp_path, tiny_models, ray_local):
    """ray.model_ops: the demo's tasks (ops kept in Ray's workers) and base's actors (a
    pool per stage) are one op on two kinds of worker: the same vectors, to the bit."""
    uris = make_catalogue(str(tmp_path / "catalogue"), num_images=6, image_size=64, num_triplets=1,
                          num_queries=2, seed=4)
    vectors = {}
    for ops in ("tasks", "actors"):
        cfg = make_config(tmp_path / ops, tiny_models, f"catalogue.manifest={uris['manifest']}",
                          f"ray.model_ops={ops}")
        assert [s.written for s in run_all(cfg)] == [6, 6, 6]
        vectors[ops] = {(r["image_id"], r["kind"]): r["vector"] for r in rows(cfg, "embeddings").to_pylist()}
    assert len(vectors["tasks"]) == 12 and vectors["tasks"] == vectors["actors"]


def test_a_kept_op_is_built_again_when_its_model_files_change(lake, tmp_path, tiny_models):
    """A kept op's key holds its model folders' file stamps: weights rewritten in place
    (finetune_embedder run again into the same output) are loaded again."""
    import os
    import shutil

    from ops.embed import EmbedOp
    from pipelines.common import kept_op_key
    from pipelines.context import RunContext

    model = tmp_path / "embedder"
    shutil.copytree(lake["cfg"].models.embedder.name_or_path, model)
    ctx = RunContext.create(make_config(tmp_path, tiny_models, f"models.embedder.name_or_path={model}"), "r")
    before = kept_op_key(EmbedOp, ctx, {})
    assert kept_op_key(EmbedOp, ctx, {}) == before
    weights = next(p for p in model.iterdir() if p.suffix == ".safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert kept_op_key(EmbedOp, ctx, {}) != before


def test_each_run_applies_its_ray_data_settings_also_to_a_ray_already_started(ray_local, tiny_models, tmp_path):
    """The session's Ray was started by the test fixture, not by init_ray: a run still
    gets its config's Ray Data settings, and a later run's null shuffle_strategy is Ray's
    default again."""
    import ray

    from pipelines.context import init_ray

    data = ray.data.DataContext.get_current()
    init_ray(make_config(tmp_path, tiny_models, "ray.shuffle_strategy=hash_shuffle", "ray.read_min_blocks=3"))
    assert (str(data.shuffle_strategy.value), data.read_op_min_num_blocks) == ("hash_shuffle", 3)
    assert data.raise_original_map_exception and not data.enable_progress_bars
    init_ray(make_config(tmp_path, tiny_models, "ray.shuffle_strategy=null"))
    assert data.shuffle_strategy == ray.data.DataContext().shuffle_strategy
    assert data.read_op_min_num_blocks == 1
