"""Ingest on an unchanged night reads no image: the store's (size, mtime) or the manifest's
ETag decide, a changed one is read again, a lake from before stamps migrates, and the
manifest's `deleted` column removes images."""
import os

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.common import ManifestError
from pipelines.synthetic import make_catalogue
from tests.conftest import run_stage, tiny_config


def images(cfg):
    t = lance.dataset(f"{cfg.storage.root}/images.lance").to_table()
    return {r["image_id"]: r for r in t.to_pylist()}


def garble_keeping_stamp(path):
    """Replaces a file's bytes by garbage of the same size and puts its mtime back: only
    a stage that reads the bytes can tell."""
    st = os.stat(path)
    with open(path, "wb") as f:
        f.write(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture()
def catalogue(tmp_path, tiny_models, ray_local):
    uris = make_catalogue(str(tmp_path / "cat"), num_images=6, image_size=64, num_triplets=0, num_queries=1, seed=4)
    manifest = pq.read_table(uris["manifest"]).select(["image_id", "uri", "caption"]).to_pylist()
    cfg = tiny_config(tmp_path, tiny_models, f"catalogue.manifest={tmp_path}/manifest.parquet")
    return cfg, manifest, tmp_path / "manifest.parquet"


def test_only_new_stamps_are_read_and_marked_rows_leave(catalogue):
    """Night 1: a file garbled under its old (size, mtime) and one garbled under its old
    manifest ETag are not read; a touched file with the same bytes and a changed ETag
    over the same bytes are read and only restamped. Night 2: a new mtime reads the
    garbled file (rejected) and a row marked deleted leaves. A bad marker is refused."""
    cfg, manifest, path = catalogue
    for i, r in enumerate(manifest):
        r["etag"] = f"e{i}" if i >= 4 else None  # a manifest may carry etags for some rows
    pq.write_table(pa.Table.from_pylist(manifest), path)
    first = run_stage(cfg, "ingest")
    assert (first.written, first.rejected) == (6, 0)
    before = images(cfg)
    stamps = [before[r["image_id"]]["stamp"] for r in manifest]
    assert all(s.startswith("size:") and ";mtime_ns:" in s for s in stamps[:4])
    assert stamps[4:] == ["etag:e4", "etag:e5"]

    garble_keeping_stamp(manifest[0]["uri"])
    st = os.stat(manifest[1]["uri"])
    os.utime(manifest[1]["uri"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with open(manifest[4]["uri"], "wb") as f:
        f.write(b"not an image")
    manifest[5]["etag"] = "e5-new"
    pq.write_table(pa.Table.from_pylist(manifest), path)
    night = run_stage(cfg, "ingest")
    assert (night.written, night.skipped, night.rejected) == (2, 4, 0)
    after = images(cfg)
    restamped = {manifest[1]["image_id"], manifest[5]["image_id"]}
    assert {k for k in after if after[k] != before[k]} == restamped
    assert all(after[k]["sha256"] == before[k]["sha256"] for k in restamped)  # captions, vectors stay
    assert after[manifest[5]["image_id"]]["stamp"] == "etag:e5-new"

    os.utime(manifest[0]["uri"])
    marks = [None, "0", "true", "", "FALSE", "1 "]
    pq.write_table(pa.Table.from_pylist([dict(r, deleted=m) for r, m in zip(manifest, marks)]), path)
    night = run_stage(cfg, "ingest")
    assert (night.read, night.written, night.rejected, night.deleted) == (4, 0, 1, 2)
    rejects = lance.dataset(f"{cfg.storage.root}/rejects.lance").to_table().to_pylist()
    assert [(r["key"], "corrupt" in r["reason"] or "not an image" in r["reason"]) for r in rejects] == [
        (manifest[0]["image_id"], True)]
    assert set(images(cfg)) == {manifest[i]["image_id"] for i in (0, 1, 3, 4)}

    marks[3] = "gone"
    pq.write_table(pa.Table.from_pylist([dict(r, deleted=m) for r, m in zip(manifest, marks)]), path)
    with pytest.raises(ManifestError, match=rf"image_id '{manifest[3]['image_id']}' has deleted='gone'"):
        run_stage(cfg, "ingest")
    assert len(images(cfg)) == 4


def test_a_lake_from_before_stamps_hashes_once_then_skips(catalogue):
    from ops.schemas import IMAGES

    cfg, manifest, path = catalogue
    pq.write_table(pa.Table.from_pylist(manifest), path)
    run_stage(cfg, "ingest")
    uri = f"{cfg.storage.root}/images.lance"
    old = lance.dataset(uri).to_table().drop_columns(["stamp"])
    lance.write_dataset(old, uri, mode="overwrite")  # as the previous version wrote it
    assert lance.dataset(uri).schema.names == IMAGES.names[:-1]

    dry = run_stage(cfg, "ingest", dry_run=True)
    assert (dry.changed, dry.unchanged) == (6, 0) and lance.dataset(uri).schema.names == IMAGES.names[:-1]
    night = run_stage(cfg, "ingest")  # every image hashed once, rows rewritten with their stamps
    assert night.written == 6 and lance.dataset(uri).schema.names == IMAGES.names
    assert all(r["stamp"] for r in images(cfg).values())
    assert {k: r["sha256"] for k, r in images(cfg).items()} == {k: r["sha256"] for k, r in
                                                                ((r["image_id"], r) for r in old.to_pylist())}
    garble_keeping_stamp(manifest[2]["uri"])
    assert run_stage(cfg, "ingest").written == 0
