"""Metrics by hand, the loaders on small files in each official format, submission round trips, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
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
    pool = {"a": 2, "b": 4}  # each ranking is its query's whole gallery, the reference removed
    r = recall_at(rankings, targets, (1, 2, 3, 4), pool, exclude={"a": "ref", "b": "nothere"})
    assert r == {1: 0.0, 2: 50.0, 3: 50.0, 4: 100.0}
    assert recall_at(rankings, targets, (2,), pool)[2] == 0.0  # without removal, t is 3rd


@pytest.mark.fast
def test_a_k_deeper_than_the_rankings_is_refused_not_computed_low():
    top10 = {"q": [f"g{i}" for i in range(10)]}
    # A gallery of 100: R@50 from a top-10 file would count every target past 10 as a miss.
    with pytest.raises(MetricsError, match=r"R@50 needs each query's top 50, but the ranking of query q holds 10"):
        recall_at(top10, {"q": "g60"}, (1, 10, 50), {"q": 100})
    assert recall_at(top10, {"q": "g3"}, (1, 10), {"q": 100}) == {1: 0.0, 10: 100.0}
    # A gallery of 10 is ranked whole by a top-10 file: R@50 is exact.
    assert recall_at(top10, {"q": "g9"}, (50,), {"q": 10}) == {50: 100.0}
    with pytest.raises(MetricsError, match=r"mAP@50 needs each query's top 50, but the ranking of query q holds 10"):
        map_at(top10, {"q": ["g1"]}, (5, 50), {"q": 1000})


@pytest.mark.fast
def test_recall_subset_ranks_only_the_members_without_the_reference():
    rankings = {"q": ["g1", "ref", "g2", "m1", "t", "m2"]}
    members = {"q": ["ref", "m1", "t", "m2"]}
    r = recall_subset_at(rankings, {"q": "t"}, members, {"q": "ref"}, (1, 2, 3))
    assert r == {1: 0.0, 2: 100.0, 3: 100.0}  # subset order: m1, t, m2
    # A top-k cut that lost a member cannot order the subset: refused, not counted last.
    with pytest.raises(MetricsError, match=r"ranking of query q \(4 images deep\) lacks m2, t: rank the whole"):
        recall_subset_at({"q": rankings["q"][:4]}, {"q": "t"}, members, {"q": "ref"}, (1,))


@pytest.mark.fast
def test_circo_average_precision_with_fewer_ground_truths_than_k():
    # Relevant at ranks 2 and 4 of 2 ground truths: (1/2 + 2/4) / min(5, 2) = 0.5
    assert average_precision_at(["x", "a", "y", "b", "z"], ["a", "b"], 5) == pytest.approx(0.5)
    # K = 3 keeps only the hit at rank 2: (1/2) / min(3, 2) = 0.25
    assert average_precision_at(["x", "a", "y", "b", "z"], ["a", "b"], 3) == pytest.approx(0.25)
    # 6 ground truths, K = 2, both first: (1 + 1) / min(2, 6) = 1
    assert average_precision_at(["a", "b"], list("abcdef"), 2) == pytest.approx(1.0)
    m = map_at({"1": ["x", "a", "y", "b", "z"], "2": ["a", "q"]}, {"1": ["a", "b"], "2": ["a"]}, (5,),
               {"1": 5, "2": 2})
    assert m[5] == pytest.approx(100 * (0.5 + 1.0) / 2)


@pytest.mark.fast
def test_circo_refuses_duplicates():
    with pytest.raises(MetricsError, match="query 7: image a appears more than once"):
        map_at({"7": ["a", "b", "a"]}, {"7": ["a"]}, (5,), {"7": 2})


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
    rankings = {"12": ["dev-1-0-img0", "dev-1-0-img2", "dev-1-0-img1", "dev-9-9-img9"],
                "13": ["dev-1-0-img0", "dev-1-0-img1", "dev-9-9-img9", "dev-1-0-img2"]}
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
def test_fashioniq_loader_joins_captions_as_searle_and_averages_categories(tmp_path):
    root = tmp_path / "fiq"
    data = {"dress": ("D1", "D2"), "shirt": ("S1", "S2"), "toptee": ("T1", "T2")}
    others = {"dress": ["dress-other"], "shirt": ["shirt-other"], "toptee": [f"toptee-{i}" for i in range(10)]}
    for cat, (cand, tgt) in data.items():
        captions = [["is shorter.", "has red stripes"]] + ([["", " is blue."]] if cat == "dress" else [])
        _write(f"{root}/captions/cap.{cat}.val.json",
               [{"candidate": cand, "target": tgt, "captions": c} for c in captions])
        _write(f"{root}/image_splits/split.{cat}.val.json", [cand, tgt, *others[cat]])
    b = ev.load("fashioniq", str(root), "val", "/img")
    assert [q["query_id"] for q in b.queries] == ["dress-0", "dress-1", "shirt-0", "toptee-0"]
    # SEARLE's f"{c0.strip('.?, ')} and {c1.strip('.?, ')}": an empty first caption stays empty.
    assert b.queries[0]["modification_text"] == "is shorter and has red stripes"
    assert b.queries[1]["modification_text"] == " and is blue"
    assert b.gallery[0] == {"image_id": "D1", "uri": "/img/D1.png"}
    p2w = ev.load("fashioniq", str(root), "val", "/img", fashioniq_captions="pic2word")
    assert [q["modification_text"] for q in p2w.queries[:2]] == ["has red stripes and is shorter.", " is blue. and "]
    # dress: target first; shirt: the target is 2nd, after an image of another category
    # (dropped: each category searches its own gallery); toptee: 11th of its 11.
    rankings = {"dress-0": ["D2", "dress-other"], "dress-1": ["D2", "dress-other"],
                "shirt-0": ["D1", "S2", "shirt-other"], "toptee-0": [*others["toptee"], "T2"]}
    m = ev.evaluate(b, rankings)
    assert m["dress_R@10"] == 100.0 and m["shirt_R@10"] == 100.0 and m["toptee_R@10"] == 0.0
    assert m["toptee_R@50"] == 100.0
    assert m["avg_R@10"] == pytest.approx(200 / 3) and m["avg_R@50"] == pytest.approx(100.0)
    with pytest.raises(MetricsError, match="R@50 needs each query's top 11, but the ranking of query toptee-0 holds 9"):
        ev.evaluate(b, rankings | {"toptee-0": others["toptee"][:9]})
    _write(f"{root}/captions/cap.dress.val.json", [{"candidate": "D1", "target": "D2", "captions": ["one"]}])
    with pytest.raises(ev.AnnotationError, match=r"cap.dress.val.json: entry 0 has captions \['one'\]; expected two"):
        ev.load("fashioniq", str(root), "val", "/img")


@pytest.mark.fast
def test_circo_loader_submission_and_missing_queries(tmp_path):
    # CIRCO's official layout (its README): annotations/ beside COCO2017_unlabeled/ in one root.
    root = tmp_path / "circo"
    _write(f"{root}/annotations/val.json", [
        {"id": 0, "reference_img_id": 11, "target_img_id": 21, "relative_caption": "is red", "shared_concept": "a car",
         "gt_img_ids": [21, 22]}])
    _write(f"{root}/annotations/test.json", [
        {"id": 5, "reference_img_id": 11, "relative_caption": "is blue", "shared_concept": "a car"}])
    _write(f"{root}/{ev.CIRCO_GALLERY}", {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(60)]})
    b = ev.load("circo", str(root), "val")
    assert b.queries[0]["shared_concept"] == "a car"
    assert b.gallery[21]["uri"] == f"{root}/COCO2017_unlabeled/unlabeled2017/000000000021.jpg"
    ranked = ["21", "9", "22"] + [str(i) for i in range(60) if i not in (21, 9, 22)]
    assert ev.evaluate(b, {"0": ranked})["mAP@5"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    with pytest.raises(MetricsError, match="mAP@50 needs each query's top 50, but the ranking of query 0 holds 10"):
        ev.evaluate(b, {"0": ranked[:10]})
    with pytest.raises(MetricsError, match="miss 1 of 1 circo queries, e.g. 0"):
        ev.evaluate(b, {"7": ["21"]})
    t = ev.load("circo", str(root), "test")
    (path,) = ev.submission(t, {"5": [str(i) for i in range(60)]}, str(tmp_path / "sub"))
    assert json.load(open(path)) == {"5": [str(i) for i in range(50)]}
    with pytest.raises(MetricsError, match="mAP@50 needs each query's top 50, but the ranking of query 5 holds 10"):
        ev.submission(t, {"5": [str(i) for i in range(10)]}, str(tmp_path / "sub"))


@pytest.mark.fast
def test_annotations_in_another_format_name_the_file_and_field(cirr):
    _write(f"{cirr}/captions/cap.rc2.val.json", [{"pairid": 1, "reference": "r", "caption": "c"}])
    with pytest.raises(ev.AnnotationError, match=r"cap.rc2.val.json: entry 0 has no field 'img_set'"):
        ev.load("cirr", cirr, "val", "/x")


def test_evaluate_cli_writes_flat_metrics(cirr, tmp_path):
    # The rank stage's whole-gallery rows (reference removed): 12 finds its target first, 13 second.
    rows = [("12", 1, "dev-1-0-img2"), ("12", 2, "dev-1-0-img1"), ("12", 3, "dev-9-9-img9"),
            ("13", 1, "dev-1-0-img0"), ("13", 2, "dev-9-9-img9"), ("13", 3, "dev-1-0-img2")]
    pq.write_table(pa.table({"query_id": [r[0] for r in rows], "rank": [r[1] for r in rows],
                             "image_id": [r[2] for r in rows], "score": [1.0, 0.9, 0.8] * 2}), f"{tmp_path}/r.parquet")
    out = subprocess.run([sys.executable, "-m", "pipelines", "evaluate", "--benchmark", "cirr", "--annotations", cirr,
                          "--rankings", f"{tmp_path}/r.parquet", "--out", f"{tmp_path}/m.json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    m = json.load(open(f"{tmp_path}/m.json"))
    assert sorted(m) == ["R@1", "R@10", "R@5", "R@50", "Rs@1", "Rs@2", "Rs@3"] and m["R@1"] == 50.0
    bad = subprocess.run([sys.executable, "-m", "pipelines", "evaluate", "--benchmark", "cirr", "--annotations",
                          f"{tmp_path}/nowhere", "--rankings", f"{tmp_path}/r.parquet"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error: annotation file" in bad.stderr and "Traceback" not in bad.stderr
    pq.write_table(pa.table({"query_id": ["12", "13"], "rank": [1, 1], "image_id": ["dev-1-0-img2"] * 2,
                             "score": [1.0, 1.0]}), f"{tmp_path}/top1.parquet")
    shallow = subprocess.run([sys.executable, "-m", "pipelines", "evaluate", "--benchmark", "cirr", "--annotations",
                              cirr, "--rankings", f"{tmp_path}/top1.parquet"], capture_output=True, text=True)
    assert shallow.returncode == 2 and "R@50 needs each query's top 3" in shallow.stderr, shallow.stderr


@pytest.mark.fast
def test_cirr_metrics_from_a_whole_gallery_file_equal_the_official_arithmetic(tmp_path):
    """Random scores over a CIRR-format val split (img_sets of 6, as in cap.rc2.val.json):
    our metrics, from the rankings file the rank stage writes with conf/eval/cirr.yaml
    (the whole gallery, reference removed), equal the arithmetic of the official
    validation code (SEARLE's cirr_compute_val_metrics: argsort of the distances over
    the whole gallery, reference masked out, group members masked in)."""
    rng = np.random.default_rng(0)
    names = [f"dev-{s}-{j}-img{j}" for s in range(30) for j in range(6)]  # 30 img_sets of 6
    caps = []
    for p in range(120):
        group = names[6 * (p % 30):6 * (p % 30) + 6]
        ref, target = rng.choice(group, 2, replace=False)
        caps.append({"pairid": p, "reference": str(ref), "target_hard": str(target), "caption": f"edit {p}",
                     "target_soft": {}, "img_set": {"id": p % 30, "members": group}})
    root = tmp_path / "cirr"
    _write(f"{root}/captions/cap.rc2.val.json", caps)
    _write(f"{root}/image_splits/split.rc2.val.json", {n: f"./dev/{n}.png" for n in names})
    scores = rng.normal(size=(len(caps), len(names))).astype(np.float32)

    # The official arithmetic, on the full score matrix.
    order = np.argsort(1 - scores, axis=-1, kind="stable")
    ranked = np.asarray(names)[order]
    refs = np.asarray([c["reference"] for c in caps])
    ranked = ranked[ranked != refs[:, None]].reshape(len(caps), len(names) - 1)
    labels = ranked == np.asarray([c["target_hard"] for c in caps])[:, None]
    groups = np.asarray([c["img_set"]["members"] for c in caps])
    group_mask = (ranked[..., None] == groups[:, None, :]).any(-1)
    group_labels = labels[group_mask].reshape(len(caps), -1)
    official = {f"R@{k}": 100 * labels[:, :k].sum() / len(caps) for k in (1, 5, 10, 50)}
    official |= {f"Rs@{k}": 100 * group_labels[:, :k].sum() / len(caps) for k in (1, 2, 3)}

    # The rank stage's rows: every gallery image but the reference, by score.
    rows = {"query_id": [], "rank": [], "image_id": [], "score": []}
    for c, s in zip(caps, scores):
        ids = [(float(v), n) for n, v in zip(names, s) if n != c["reference"]]
        for r, (v, n) in enumerate(sorted(ids, key=lambda t: -t[0]), 1):
            for k, x in (("query_id", str(c["pairid"])), ("rank", r), ("image_id", n), ("score", v)):
                rows[k].append(x)
    pq.write_table(pa.table(rows), f"{tmp_path}/whole.parquet")
    b = ev.load("cirr", str(root), "val", "/img")
    rankings = ev.read_rankings(f"{tmp_path}/whole.parquet")
    ours = ev.evaluate(b, rankings)
    assert ours == pytest.approx(official)
    assert 0 < ours["Rs@1"] < ours["Rs@3"] < 100  # a sample where the subset order matters

    # The test server's recall_subset file holds 3 members per query, the official order's first 3.
    (_, subset_path) = ev.submission(b, rankings, str(tmp_path / "sub"))
    subset = json.load(open(subset_path))
    official_subset = ranked[group_mask].reshape(len(caps), -1)[:, :3]
    assert all(subset[str(c["pairid"])] == list(official_subset[i]) for i, c in enumerate(caps))

    # A top-50 file cannot order every img_set: refused, where counting the absent
    # members last gave a lower Rs@K than the official code.
    top50 = {q: r[:50] for q, r in rankings.items()}
    with pytest.raises(MetricsError, match=r"Rs@K ranks each query's img_set members, but the ranking of query \d+ "
                                           r"\(50 images deep\) lacks"):
        ev.evaluate(b, top50)
    with pytest.raises(MetricsError, match="lacks"):
        ev.submission(b, top50, str(tmp_path / "sub50"))
