"""`python -m pipelines evaluate`: the official annotation formats of CIRR, FashionIQ and
CIRCO -> the project's queries table and gallery manifest, metrics from a rankings
file, and the test servers' submission files.

Ids: CIRR's query_id is the pairid and its image_id the image name; FashionIQ's
query_id is `{category}-{index in cap.{category}.{split}.json}` and its image_id the
ASIN; CIRCO's query_id is the query id and its image_id the COCO image id, as strings.

FashionIQ's two captions are joined into one modification text as SEARLE's validation
does: "{first} and {second}", each stripped of the characters ".?, " at both ends, an
empty caption kept as empty (SEARLE also averages this with the reversed order's
features; a query here is one text). `eval.fashioniq_captions: pic2word` joins them as
Pic2Word does instead: "{second} and {first}", unstripped.

The default image root follows each benchmark's official layout (default_image_root).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from model.errors import PipelineError
from ops.metrics import MetricsError, check_depth, map_at, recall_at, recall_subset_at, subset_ranking
from ops.storage import filesystem, is_s3, read_bytes, write_bytes

BENCHMARKS = ("cirr", "fashioniq", "circo")
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
CIRCO_GALLERY = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"


class AnnotationError(PipelineError):
    pass


@dataclass
class Benchmark:
    """Queries (rows of the queries table), the gallery (rows of a manifest) and the truth."""

    name: str
    split: str
    queries: list[dict] = field(default_factory=list)
    gallery: list[dict] = field(default_factory=list)
    truth: dict[str, dict] = field(default_factory=dict)


def _load_json(path: str, s3: dict | None = None):
    try:
        return json.loads(read_bytes(path, s3))
    except (FileNotFoundError, OSError):
        raise AnnotationError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"annotation file {path} is not valid JSON: {e}") from None


def _field(entry, key: str, path: str, where) -> object:
    if not isinstance(entry, dict) or key not in entry:
        raise AnnotationError(f"{path}: entry {where} has no field {key!r}")
    return entry[key]


def load_cirr(root: str, split: str, image_root: str, s3: dict | None = None) -> Benchmark:
    cap_path = f"{root}/captions/cap.rc2.{split}.json"
    split_path = f"{root}/image_splits/split.rc2.{split}.json"
    caps, names = _load_json(cap_path, s3), _load_json(split_path, s3)
    if not isinstance(caps, list):
        raise AnnotationError(f"{cap_path}: expected a list of queries")
    if not isinstance(names, dict):
        raise AnnotationError(f"{split_path}: expected an object of image name -> relative path")
    b = Benchmark("cirr", split)
    b.gallery = [{"image_id": n, "uri": f"{image_root.rstrip('/')}/{str(p).removeprefix('./')}"}
                 for n, p in sorted(names.items())]
    for i, c in enumerate(caps):
        qid = str(_field(c, "pairid", cap_path, i))
        ref = _field(c, "reference", cap_path, i)
        members = _field(_field(c, "img_set", cap_path, i), "members", cap_path, i)
        target = c.get("target_hard") if split != "test1" else None
        if split != "test1" and target is None:
            raise AnnotationError(f"{cap_path}: entry {i} has no field 'target_hard'")
        b.queries.append(
            {
                "query_id": qid,
                "reference_id": ref,
                "modification_text": _field(c, "caption", cap_path, i),
                "shared_concept": None,
                "target_id": target,
            }
        )
        b.truth[qid] = {"target": target, "reference": ref, "members": list(members)}
    return b


FASHIONIQ_JOINS = ("searle", "pic2word")


def join_fashioniq_captions(captions: list[str], style: str = "searle") -> str:
    first, second = captions
    if style == "pic2word":
        return f"{second} and {first}"
    return f"{first.strip('.?, ')} and {second.strip('.?, ')}"


def load_fashioniq(
    root: str, split: str, image_root: str, s3: dict | None = None, image_ext: str = ".png",
    captions_join: str = "searle",
) -> Benchmark:
    b = Benchmark("fashioniq", split)
    seen = set()
    for cat in FASHIONIQ_CATEGORIES:
        cap_path = f"{root}/captions/cap.{cat}.{split}.json"
        split_path = f"{root}/image_splits/split.{cat}.{split}.json"
        caps, asins = _load_json(cap_path, s3), _load_json(split_path, s3)
        if not isinstance(caps, list) or not isinstance(asins, list):
            raise AnnotationError(f"{cap_path} and {split_path} must each hold a list")
        for a in asins:
            if a not in seen:
                seen.add(a)
                b.gallery.append({"image_id": a, "uri": f"{image_root.rstrip('/')}/{a}{image_ext}"})
        for i, c in enumerate(caps):
            qid = f"{cat}-{i}"
            ref = _field(c, "candidate", cap_path, i)
            captions = _field(c, "captions", cap_path, i)
            if not (isinstance(captions, list) and len(captions) == 2
                    and all(isinstance(t, str) for t in captions)):
                raise AnnotationError(
                    f"{cap_path}: entry {i} has captions {captions!r}; expected two strings"
                )
            target = c.get("target") if split != "test" else None
            if split != "test" and target is None:
                raise AnnotationError(f"{cap_path}: entry {i} has no field 'target'")
            b.queries.append(
                {
                    "query_id": qid,
                    "reference_id": ref,
                    "modification_text": join_fashioniq_captions(captions, captions_join),
                    "shared_concept": cat,
                    "target_id": target,
                }
            )
            b.truth[qid] = {"target": target, "reference": ref, "category": cat, "gallery": set(asins)}
    return b


def load_circo(root: str, split: str, image_root: str, s3: dict | None = None) -> Benchmark:
    ann_path = f"{root}/annotations/{split}.json"
    gallery_path = f"{image_root.rstrip('/')}/{CIRCO_GALLERY}"
    anns, info = _load_json(ann_path, s3), _load_json(gallery_path, s3)
    if not isinstance(anns, list):
        raise AnnotationError(f"{ann_path}: expected a list of queries")
    images = _field(info, "images", gallery_path, "(top level)")
    b = Benchmark("circo", split)
    b.gallery = [
        {
            "image_id": str(_field(im, "id", gallery_path, n)),
            "uri": f"{image_root.rstrip('/')}/COCO2017_unlabeled/unlabeled2017/"
            f"{_field(im, 'file_name', gallery_path, n)}",
        }
        for n, im in enumerate(images)
    ]
    for i, a in enumerate(anns):
        qid = str(_field(a, "id", ann_path, i))
        gt = a.get("gt_img_ids") if split != "test" else None
        if split != "test" and gt is None:
            raise AnnotationError(f"{ann_path}: entry {i} has no field 'gt_img_ids'")
        b.queries.append(
            {
                "query_id": qid,
                "reference_id": str(_field(a, "reference_img_id", ann_path, i)),
                "modification_text": _field(a, "relative_caption", ann_path, i),
                "shared_concept": _field(a, "shared_concept", ann_path, i),
                "target_id": str(gt[0]) if gt else None,
            }
        )
        b.truth[qid] = {
            "gt": [str(g) for g in gt] if gt else None,
            "reference": b.queries[-1]["reference_id"],
        }
    return b


def default_image_root(name: str, root: str) -> str:
    """The images' root in the benchmark's official layout: CIRCO's COCO2017_unlabeled/
    sits beside its annotations/ in the dataset root; FashionIQ's and the project's CIRR
    layout keep the images under <root>/images."""
    return root if name == "circo" else f"{root.rstrip('/')}/images"


def load(name: str, root: str, split: str, image_root: str | None = None, s3: dict | None = None,
         fashioniq_captions: str = "searle") -> Benchmark:
    if name not in BENCHMARKS:
        raise AnnotationError(f"unknown benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}")
    if fashioniq_captions not in FASHIONIQ_JOINS:
        raise AnnotationError(f"unknown FashionIQ caption join {fashioniq_captions!r}: expected one of "
                              f"{', '.join(FASHIONIQ_JOINS)}")
    image_root = image_root or default_image_root(name, root)
    if name == "fashioniq":
        return load_fashioniq(root, split, image_root, s3, captions_join=fashioniq_captions)
    return {"cirr": load_cirr, "circo": load_circo}[name](root, split, image_root, s3)


def read_rankings(path: str, s3: dict | None = None) -> dict[str, list[str]]:
    """query_id -> image ids by rank, from a Parquet rankings file (query_id, rank, image_id, score)."""
    fs, p = filesystem(path, s3)
    try:
        table = pq.read_table(p, filesystem=fs, columns=["query_id", "rank", "image_id"])
    except (FileNotFoundError, OSError) as e:
        raise MetricsError(f"rankings file {path}: cannot be read ({e})") from None
    except (KeyError, pa.ArrowInvalid) as e:
        raise MetricsError(f"rankings file {path} needs columns query_id, rank, image_id: {e}") from None
    table = table.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    out: dict[str, list[str]] = {}
    for q, image in zip(table.column("query_id").to_pylist(), table.column("image_id").to_pylist()):
        out.setdefault(str(q), []).append(str(image))
    return out


def _check_covered(b: Benchmark, rankings: dict) -> None:
    missing = [q for q in b.truth if q not in rankings]
    if missing:
        raise MetricsError(
            f"the rankings miss {len(missing)} of {len(b.truth)} {b.name} queries, e.g. "
            f"{', '.join(missing[:10])}"
        )


def candidates(b: Benchmark, q: str) -> list[str]:
    """The gallery query q is ranked against: FashionIQ's category gallery, else the
    whole gallery."""
    t = b.truth[q]
    return sorted(t["gallery"]) if b.name == "fashioniq" else [g["image_id"] for g in b.gallery]


def pools(b: Benchmark) -> dict[str, int]:
    """How many images each query's full ranking holds: its gallery less its reference
    (which the rank stage may have removed, exclude_reference), the metrics' depth."""
    whole = {g["image_id"] for g in b.gallery}
    out = {}
    for q, t in b.truth.items():
        gallery = t["gallery"] if b.name == "fashioniq" else whole
        out[q] = len(gallery) - (t["reference"] in gallery)
    return out


def evaluate(b: Benchmark, rankings: dict[str, list[str]]) -> dict[str, float]:
    """The benchmark's metrics (flat, in %), from rankings covering every query, each
    deep enough for the deepest K (else MetricsError, naming the depth)."""
    _check_covered(b, rankings)
    pool = pools(b)
    if b.name == "cirr":
        targets = {q: t["target"] for q, t in b.truth.items()}
        refs = {q: t["reference"] for q, t in b.truth.items()}
        r = recall_at(rankings, targets, (1, 5, 10, 50), pool, exclude=refs)
        rs = recall_subset_at(
            rankings, targets, {q: t["members"] for q, t in b.truth.items()}, refs, (1, 2, 3)
        )
        return {**{f"R@{k}": v for k, v in r.items()}, **{f"Rs@{k}": v for k, v in rs.items()}}
    if b.name == "fashioniq":
        out = {}
        for cat in FASHIONIQ_CATEGORIES:
            qs = {q: t for q, t in b.truth.items() if t["category"] == cat}
            # Each category is searched over its own gallery only.
            ranked = {q: [i for i in rankings[q] if i in t["gallery"]] for q, t in qs.items()}
            r = recall_at(ranked, {q: t["target"] for q, t in qs.items()}, (10, 50), pool)
            out.update({f"{cat}_R@{k}": v for k, v in r.items()})
        for k in (10, 50):
            out[f"avg_R@{k}"] = sum(out[f"{c}_R@{k}"] for c in FASHIONIQ_CATEGORIES) / len(
                FASHIONIQ_CATEGORIES
            )
        return out
    m = map_at(rankings, {q: t["gt"] for q, t in b.truth.items()}, (5, 10, 25, 50), pool)
    return {f"mAP@{k}": v for k, v in m.items()}


def chance(b: Benchmark, seed: int = 0) -> dict[str, float]:
    """The metrics of a random ranking of each query's gallery (the mean of seeded draws,
    about 20,000 query rankings in all), computed by the same metric code as the
    methods': the chance level beside every table. Galleries over 10,000 images draw
    only each query's top 60 (deeper than any K), with CIRR's img_set members that the
    draw missed after it in random order: the same distribution as a full shuffle for
    every metric."""
    import random

    rng = random.Random(seed)
    trials = max(1, min(200, 20_000 // max(1, len(b.truth))))
    pool = {q: candidates(b, q) for q in b.truth}
    total: dict[str, float] = {}
    for _ in range(trials):
        ranked = {}
        for q, ids in pool.items():
            top = rng.sample(ids, len(ids) if len(ids) <= 10_000 else 60)
            drawn = set(top)
            rest = [m for m in b.truth[q].get("members", ()) if m not in drawn]
            rng.shuffle(rest)
            ranked[q] = top + rest
        for k, v in evaluate(b, ranked).items():
            total[k] = total.get(k, 0.0) + v / trials
    return total


def submission(
    b: Benchmark, rankings: dict[str, list[str]], out_dir: str, s3: dict | None = None
) -> list[str]:
    """The test server's files: CIRR's recall (top 50) and recall_subset (top 3) JSONs,
    CIRCO's query id -> 50 unique image ids. Returns their paths."""
    _check_covered(b, rankings)
    pool = pools(b)
    if b.name == "cirr":
        recall = {"version": "rc2", "metric": "recall"}
        subset = {"version": "rc2", "metric": "recall_subset"}
        for q, t in b.truth.items():
            ranked = [i for i in rankings[q] if i != t["reference"]]
            check_depth("the recall submission's R", q, ranked, 50, pool[q])
            recall[q] = ranked[:50]
            subset[q] = subset_ranking(q, ranked, t["members"], t["reference"])[:3]
        files = {
            f"{out_dir}/recall_submission_cirr.json": recall,
            f"{out_dir}/recall_subset_submission_cirr.json": subset,
        }
    elif b.name == "circo":
        # Refuses duplicates, like the server, and rankings under 50 deep.
        map_at(rankings, {q: ["_"] for q in b.truth}, (50,), pool)
        files = {f"{out_dir}/circo_submission.json": {q: rankings[q][:50] for q in b.truth}}
    else:
        raise MetricsError("FashionIQ has no test server: evaluate its val split instead")
    for path, content in files.items():
        write_bytes(path, json.dumps(content).encode(), s3)
    return list(files)


def main(args) -> int:
    """The `evaluate` command (arguments parsed by pipelines/__main__.py)."""
    b = load(args.benchmark, args.annotations, args.split, args.image_root)
    rankings = read_rankings(args.rankings)
    if args.submission:
        for path in submission(b, rankings, args.submission):
            print(f"[evaluate] wrote {path}")
    if not all(t.get("target") or t.get("gt") for t in b.truth.values()):
        print(
            f"[evaluate] {args.benchmark} {args.split} has no ground truth: "
            "metrics are the test server's to compute"
        )
        return 0
    metrics = evaluate(b, rankings)
    write_bytes(args.out, (json.dumps(metrics, indent=1) + "\n").encode(), None)
    print(
        f"[evaluate] {args.benchmark} {args.split}, {len(b.truth)} queries: "
        + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
        + f"; written to {args.out}"
    )
    return 0


def tables(b: Benchmark, out_dir: str, s3: dict | None = None) -> dict[str, str]:
    """The benchmark as the pipeline's inputs: queries.parquet and manifest.parquet."""
    uris = {"queries": f"{out_dir}/queries.parquet", "manifest": f"{out_dir}/manifest.parquet"}
    for key, rows in (("queries", b.queries), ("manifest", b.gallery)):
        fs, p = filesystem(uris[key], s3)
        if not is_s3(uris[key]):
            os.makedirs(os.path.dirname(p), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), p, filesystem=fs)
    return uris
