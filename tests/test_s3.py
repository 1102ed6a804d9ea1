"""The data stages with the manifest, images and tables on s3:// (moto's server, real HTTP)."""
import lance
import pyarrow.parquet as pq

from ops.storage import filesystem, lance_storage_options
from pipelines.synthetic import make_catalogue
from tests.conftest import run_stage, tiny_config as make_config


def test_stages_round_trip_through_s3(tmp_path, tiny_models, ray_local, s3_server):
    s3 = s3_server
    uris = make_catalogue("s3://lake/catalogue", num_images=6, image_size=64, num_triplets=1, num_queries=1, seed=5, s3=s3)
    fs, path = filesystem(uris["manifest"], s3)
    assert pq.read_table(path, filesystem=fs).num_rows == 6
    cfg = make_config(tmp_path, tiny_models,
                      "storage.root=s3://lake/tables", f"storage.s3.endpoint={s3['endpoint']}",
                      "storage.s3.access_key_id=testing", "storage.s3.secret_access_key=testing",
                      "storage.s3.allow_http=true", f"catalogue.manifest={uris['manifest']}")
    summaries = [run_stage(cfg, s) for s in ("ingest", "caption", "embed")]
    assert [s.written for s in summaries] == [6, 6, 6]
    opts = lance_storage_options(dict(cfg.storage.s3))
    emb = lance.dataset("s3://lake/tables/embeddings.lance", storage_options=opts).to_table()
    assert emb.num_rows == 12
    images = lance.dataset("s3://lake/tables/images.lance", storage_options=opts).to_table()
    assert all(u.startswith("s3://lake/catalogue/images/") for u in images["uri"].to_pylist())
    # a HEAD gives size and LastModified: the next night reads no object
    assert all(s.startswith("size:") and ";mtime_ns:" in s for s in images["stamp"].to_pylist())
    # the staging area is emptied after each commit
    fs, staging = filesystem("s3://lake/tables/_staging", s3)
    assert all(info.type.name == "NotFound" or info.size == 0
               for info in fs.get_file_info([f"{staging}/{s}.lance/_versions" for s in ("ingest", "caption", "embed")]))
    again = [run_stage(cfg, s) for s in ("ingest", "caption", "embed")]
    assert [s.written for s in again] == [0, 0, 0] and [s.skipped for s in again] == [6, 6, 6]


def test_the_lake_lock_on_s3_admits_one_writer(tmp_path, tiny_models, s3_server):
    from pipelines.lock import LakeLocked, lake_lock

    s3 = s3_server
    cfg = make_config(tmp_path, tiny_models, "storage.root=s3://lake/locked", f"storage.s3.endpoint={s3['endpoint']}",
                      "storage.s3.access_key_id=testing", "storage.s3.secret_access_key=testing",
                      "storage.s3.allow_http=true")
    with lake_lock(cfg, "first", "nightly"):
        try:
            with lake_lock(cfg, "second", "nightly"):
                raise AssertionError("two writers held the lake")
        except LakeLocked as e:
            assert "run first (nightly)" in str(e)
    with lake_lock(cfg, "second", "nightly"):  # released: the next run takes it
        pass
