"""Metrics by hand, the loaders on small files in each official format, submission round trips, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ops.metrics import MetricsError, average_precision_at, map_at, recall_at, recall_subset_at
from pipelines import evaluate as ev


@pytest.mark.fast
def test_recall_skips_the_reference_and_misses_outside_the_top_k():
    rankings = {"a": ["ref", "x", "t"], "b": ["y", "z", "w", "t2"]}
    targets = {"a": "t", "b": "t2"}
    # a: the reference ranked first is removed, so t moves from 3rd to 2nd; b: t2 is 4th.
    r = recall_at(rankings, targets, (1, 2, 3, 4), exclude={"a": "ref", "b": "nothere"})
    assert r == {1: 0.0, 2: 50.0, 3: 50.0, 4: 100.0}
    assert recall_at(rankings, targets, (2,))[2] == 0.0  # without removal, t is 3rd


@pytest.mark.fast
def test_recall_subset_ranks_only_the_members_without_the_reference():
    rankings = {"q": ["g1", "ref", "g2", "m1", "t", "m2"]}
    members = {"q": ["ref", "m1", "t", "m2"]}
    r = recall_subset_at(rankings, {"q": "t"}, members, {"q": "ref"}, (1, 2, 3))
    assert r == {1: 0.0, 2: 100.0, 3: 100.0}  # subset order: m1, t, m2


@pytest.mark.fast
def test_circo_average_precision_with_fewer_ground_truths_than_k():
    # Relevant at ranks 2 and 4 of 2 ground truths: (1/2 + 2/4) / min(5, 2) = 0.5
    assert average_precision_at(["x", "a", "y", "b", "z"], ["a", "b"], 5) == pytest.approx(0.5)
    # K = 3 keeps only the hit at rank 2: (1/2) / min(3, 2) = 0.25
    assert average_precision_at(["x", "a", "y", "b", "z"], ["a", "b"], 3) == pytest.approx(0.25)
    # 6 ground truths, K = 2, both first: (1 + 1) / min(2, 6) = 1
    assert average_precision_at(["a", "b"], list("abcdef"), 2) == pytest.approx(1.0)
    m = map_at({"1": ["x", "a", "y", "b", "z"], "2": ["a", "q"]}, {"1": ["a", "b"], "2": ["a"]}, (5,))
    assert m[5] == pytest.approx(100 * (0.5 + 1.0) / 2)


@pytest.mark.fast
def test_circo_refuses_duplicates():
    with pytest.raises(MetricsError, match="query 7: image a appears more than once"):
        map_at({"7": ["a", "b", "a"]}, {"7": ["a"]}, (5,))


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture
def cirr(tmp_path):
    root = tmp_path / "cirr"
    _write(f"{root}/captions/cap.rc2.val.json", [
        {"pairid": 12, "reference": "dev-1-0-img0", "target_hard": "dev-1-0-img2", "target_soft": {"dev-1-0-img2": 1.0},
         "caption": "has two dogs", "img_set": {"id": 1, "members": ["dev-1-0-img0", "dev-1-0-img1", "dev-1-0-img2"]}},
        {"pairid": 13, "reference": "dev-1-0-img1", "target_hard": "dev-9-9-img9", "target_soft": {},
         "caption": "at night", "img_set": {"id": 1, "members": ["dev-1-0-img1", "dev-9-9-img9", "dev-1-0-img0"]}},
    ])
    _write(f"{root}/image_splits/split.rc2.val.json", {n: f"./dev/{n}.png" for n in
                                                         ["dev-1-0-img0", "dev-1-0-img1", "dev-1-0-img2", "dev-9-9-img9"]})
    _write(f"{root}/captions/cap.rc2.test1.json", [
        {"pairid": 99, "reference": "test1-1-0-img0", "caption": "bigger",
         "img_set": {"id": 5, "members": ["test1-1-0-img0", "test1-1-0-img1", "test1-1-0-img2"]}}])
    _write(f"{root}/image_splits/split.rc2.test1.json", {n: f"./test1/{n}.png" for n in
                                                           ["test1-1-0-img0", "test1-1-0-img1", "test1-1-0-img2"]})
    return str(root)


@pytest.mark.fast
def test_cirr_loader_metrics_and_submission_round_trip(cirr, tmp_path):
    b = ev.load("cirr", cirr, "val", "/data/cirr")
    assert [q["query_id"] for q in b.queries] == ["12", "13"]
    assert b.queries[0]["modification_text"] == "has two dogs" and b.queries[0]["reference_id"] == "dev-1-0-img0"
    assert {"image_id": "dev-1-0-img2", "uri": "/data/cirr/dev/dev-1-0-img2.png"} in b.gallery
    rankings = {"12": ["dev-1-0-img0", "dev-1-0-img2", "dev-1-0-img1"], "13": ["dev-1-0-img0", "dev-1-0-img1", "dev-9-9-img9"]}
    m = ev.evaluate(b, rankings)
    # 12: reference first is skipped -> target at 1; 13: reference (img1) skipped -> target 2nd.
    assert (m["R@1"], m["R@5"], m["R@50"]) == (50.0, 100.0, 100.0)
    assert (m["Rs@1"], m["Rs@2"]) == (50.0, 100.0)  # 13's subset without its reference: img0, img9
    t = ev.load("cirr", cirr, "test1", "/data/cirr")
    paths = ev.submission(t, {"99": ["test1-1-0-img0", "test1-1-0-img2", "x", "test1-1-0-img1"]}, str(tmp_path / "sub"))
    recall, subset = (json.load(open(p)) for p in paths)
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and recall["99"] == ["test1-1-0-img2", "x", "test1-1-0-img1"]
    assert subset["metric"] == "recall_subset" and subset["99"] == ["test1-1-0-img2", "test1-1-0-img1"]


@pytest.mark.fast
def test_fashioniq_loader_joins_captions_and_averages_categories(tmp_path):
    root = tmp_path / "fiq"
    data = {"dress": ("D1", "D2"), "shirt": ("S1", "S2"), "toptee": ("T1", "T2")}
    for cat, (cand, tgt) in data.items():
        _write(f"{root}/captions/cap.{cat}.val.json",
               [{"candidate": cand, "target": tgt, "captions": ["is shorter.", "has red stripes"]}])
        _write(f"{root}/image_splits/split.{cat}.val.json", [cand, tgt, f"{cat}-other"])
    b = ev.load("fashioniq", str(root), "val", "/img")
    assert [q["query_id"] for q in b.queries] == ["dress-0", "shirt-0", "toptee-0"]
    assert b.queries[0]["modification_text"] == "is shorter and has red stripes"
    # dress: target first; shirt: the target is 2nd, after an image of another category
    # (dropped: each category searches its own gallery); toptee: not ranked at all.
    rankings = {"dress-0": ["D2"], "shirt-0": ["D1", "S2"], "toptee-0": ["T1"]}
    m = ev.evaluate(b, rankings)
    assert m["dress_R@10"] == 100.0 and m["shirt_R@10"] == 100.0 and m["toptee_R@10"] == 0.0
    assert m["avg_R@10"] == pytest.approx(200 / 3) and m["avg_R@50"] == pytest.approx(200 / 3)


@pytest.mark.fast
def test_circo_loader_submission_and_missing_queries(tmp_path):
    root, images = tmp_path / "circo", tmp_path / "coco"
    _write(f"{root}/annotations/val.json", [
        {"id": 0, "reference_img_id": 11, "target_img_id": 21, "relative_caption": "is red", "shared_concept": "a car",
         "gt_img_ids": [21, 22]}])
    _write(f"{root}/annotations/test.json", [
        {"id": 5, "reference_img_id": 11, "relative_caption": "is blue", "shared_concept": "a car"}])
    _write(f"{images}/{ev.CIRCO_GALLERY}", {"images": [{"id": 11, "file_name": "000000000011.jpg"},
                                                        {"id": 21, "file_name": "000000000021.jpg"}]})
    b = ev.load("circo", str(root), "val", str(images))
    assert b.queries[0]["shared_concept"] == "a car" and b.gallery[1]["uri"].endswith("unlabeled2017/000000000021.jpg")
    assert ev.evaluate(b, {"0": ["21", "9", "22"]})["mAP@5"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    with pytest.raises(MetricsError, match="miss 1 of 1 circo queries, e.g. 0"):
        ev.evaluate(b, {"7": ["21"]})
    t = ev.load("circo", str(root), "test", str(images))
    (path,) = ev.submission(t, {"5": [str(i) for i in range(60)]}, str(tmp_path / "sub"))
    assert json.load(open(path)) == {"5": [str(i) for i in range(50)]}


@pytest.mark.fast
def test_annotations_in_another_format_name_the_file_and_field(cirr):
    _write(f"{cirr}/captions/cap.rc2.val.json", [{"pairid": 1, "reference": "r", "caption": "c"}])
    with pytest.raises(ev.AnnotationError, match=r"cap.rc2.val.json: entry 0 has no field 'img_set'"):
        ev.load("cirr", cirr, "val", "/x")


def test_evaluate_cli_writes_flat_metrics(cirr, tmp_path):
    rows = [("12", 1, "dev-1-0-img2"), ("13", 1, "dev-1-0-img0"), ("13", 2, "dev-9-9-img9")]
    pq.write_table(pa.table({"query_id": [r[0] for r in rows], "rank": [r[1] for r in rows],
                             "image_id": [r[2] for r in rows], "score": [1.0, 0.9, 0.8]}), f"{tmp_path}/r.parquet")
    out = subprocess.run([sys.executable, "-m", "pipelines", "evaluate", "--benchmark", "cirr", "--annotations", cirr,
                          "--rankings", f"{tmp_path}/r.parquet", "--out", f"{tmp_path}/m.json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    m = json.load(open(f"{tmp_path}/m.json"))
    assert sorted(m) == ["R@1", "R@10", "R@5", "R@50", "Rs@1", "Rs@2", "Rs@3"] and m["R@1"] == 50.0
    bad = subprocess.run([sys.executable, "-m", "pipelines", "evaluate", "--benchmark", "cirr", "--annotations",
                          f"{tmp_path}/nowhere", "--rankings", f"{tmp_path}/r.parquet"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error: annotation file" in bad.stderr and "Traceback" not in bad.stderr
