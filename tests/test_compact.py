"""Stage `compact`: many nightly commits folded into few fragments, contents and keyed
lookups unchanged, old versions removed, nothing done when there is nothing to do."""
import pyarrow as pa
import pytest

from pipelines.config import load_config
from pipelines.lake import Lake, _upsert
from tests.conftest import run_stage

pytestmark = pytest.mark.fast

SCHEMA = pa.schema([("image_id", pa.string()), ("caption", pa.string())])


def nights(lake: Lake, n: int, rows: int) -> None:
    """n commits of `rows` new keys each, plus one changed key a night (a deletion file)."""
    for night in range(n):
        ids = [f"img{night:03d}_{i}" for i in range(rows)] + (["img000_0"] if night else [])
        table = pa.table({"image_id": ids, "caption": [f"night {night}"] * len(ids)}, schema=SCHEMA)
        _upsert(lake, "captions", ["image_id"], SCHEMA, table.to_reader())


def test_compact_folds_a_month_of_commits_and_keeps_every_row(tmp_path):
    cfg = load_config("conf/demo.yaml", [f"run_dir={tmp_path}", "compact.min_fragments=4",
                                         "compact.keep_versions_days=0"])
    lake = Lake.from_conf(cfg)
    nights(lake, 30, 5)
    before = lake.open("captions")
    rows = sorted(before.to_table().to_pylist(), key=lambda r: r["image_id"])
    assert len(before.get_fragments()) >= 30 and len(before.versions()) >= 30

    dry = run_stage(cfg, "compact", dry_run=True)
    assert dry.written == 1 and len(lake.open("captions").get_fragments()) == len(before.get_fragments())

    s = run_stage(cfg, "compact")
    after = lake.open("captions")
    assert s.read == 1 and s.written == 1
    assert len(after.get_fragments()) == s.fragments_after <= 2  # from 30 and more
    assert s.fragments_before == len(before.get_fragments()) and s.versions_removed >= 30
    assert len(after.versions()) == 1
    assert sorted(after.to_table().to_pylist(), key=lambda r: r["image_id"]) == rows
    assert len(rows) == 150 and {r["caption"] for r in rows if r["image_id"] == "img000_0"} == {"night 29"}
    # Keyed lookups through the (refreshed) BTree index still find old and new keys.
    found = lake.lookup("captions", ["img000_0", "img029_4", "nope"], ["caption"])
    assert found == {"img000_0": {"image_id": "img000_0", "caption": "night 29"},
                     "img029_4": {"image_id": "img029_4", "caption": "night 29"}}

    again = run_stage(cfg, "compact")
    assert again.written == 0 and again.skipped == 1
