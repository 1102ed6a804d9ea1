"""The three benchmarks' metrics, computed as their official code computes them, from rankings.

A ranking is a query's image ids, best first (the rankings file's rows of that query
sorted by rank). Values are percentages. A ranking may be a top-k cut of the full one;
each metric refuses, naming the depth, a ranking too shallow to compute it exactly
(the official code ranks the whole gallery), rather than count what is cut as a miss.
`pool[q]` is how many images query q is ranked against (its gallery, less what the
metric removes): a ranking is deep enough for @K when it holds min(K, pool[q]) images.

- CIRR (Liu et al., 2021, `cirr` repo): Recall@K with the reference image removed from
  the ranking; Recall_subset@K ranks only the query's img_set members, reference removed,
  so it needs every member in the ranking (rank CIRR's whole gallery).
- FashionIQ (Wu et al., 2021): Recall@K per category, over that category's gallery (the
  reference is not removed, as in the official evaluation), and the mean of the three
  categories.
- CIRCO (Baldrati et al., 2023): mAP@K, each query's average precision over its ranked
  top K, divided by min(K, number of ground truths); a ranking that repeats an image id
  is refused, as the official evaluation asserts.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from model.errors import PipelineError


class MetricsError(PipelineError):
    pass


def _without(ranking: Sequence[str], image: str | None) -> list[str]:
    return [r for r in ranking if r != image]


def check_depth(metric: str, q: str, ranking: Sequence[str], k: int, pool: int) -> None:
    need = min(k, pool)
    if len(ranking) < need:
        raise MetricsError(
            f"{metric}@{k} needs each query's top {need}, but the ranking of query {q} holds "
            f"{len(ranking)} images: rank deeper (rank.top_k of at least {need}) or leave @{k} out "
            f"(a gallery image missing from the lake, rejected at ingest, also shortens it)"
        )


def recall_at(rankings: Mapping[str, Sequence[str]], targets: Mapping[str, str], ks: Iterable[int],
              pool: Mapping[str, int], exclude: Mapping[str, str] | None = None,
              metric: str = "R") -> dict[int, float]:
    """Share of queries (in %) whose target is in the top K, `exclude[q]` removed first."""
    ks = list(ks)
    hits = {k: 0 for k in ks}
    for q, target in targets.items():
        ranked = _without(rankings[q], (exclude or {}).get(q))
        check_depth(metric, q, ranked, max(ks), pool[q])
        pos = ranked.index(target) if target in ranked else None
        for k in ks:
            hits[k] += pos is not None and pos < k
    n = max(1, len(targets))
    return {k: 100.0 * hits[k] / n for k in ks}


def recall_subset_at(rankings: Mapping[str, Sequence[str]], targets: Mapping[str, str],
                     members: Mapping[str, Sequence[str]], references: Mapping[str, str],
                     ks: Iterable[int]) -> dict[int, float]:
    """CIRR's Recall_subset@K: the ranking restricted to the img_set members minus the
    reference, which must all be in it (their order is what is measured)."""
    restricted = {q: subset_ranking(q, rankings[q], members[q], references[q]) for q in targets}
    return recall_at(restricted, targets, ks, {q: len(r) for q, r in restricted.items()}, metric="Rs")


def subset_ranking(q: str, ranking: Sequence[str], members: Sequence[str], reference: str) -> list[str]:
    """Query q's img_set members less its reference, in the ranking's order; every one
    must be in the ranking."""
    subset = set(members) - {reference}
    ranked = [r for r in ranking if r in subset]
    missing = sorted(subset.difference(ranked))
    if missing:
        raise MetricsError(
            f"Rs@K ranks each query's img_set members, but the ranking of query {q} "
            f"({len(ranking)} images deep) lacks {', '.join(missing)}: rank the whole gallery "
            f"(conf/eval/cirr.yaml's rank.top_k)"
        )
    return ranked


def average_precision_at(ranking: Sequence[str], ground_truth: Iterable[str], k: int) -> float:
    """CIRCO's AP@K (a fraction): sum over the top K of precision@i at each relevant i,
    divided by min(K, |ground truths|)."""
    gt = set(ground_truth)
    if not gt:
        raise MetricsError("a CIRCO query without ground truths")
    hits, total = 0, 0.0
    for i, image in enumerate(ranking[:k], start=1):
        if image in gt:
            hits += 1
            total += hits / i
    return total / min(k, len(gt))


def map_at(rankings: Mapping[str, Sequence[str]], ground_truths: Mapping[str, Iterable[str]],
           ks: Iterable[int], pool: Mapping[str, int]) -> dict[int, float]:
    ks = list(ks)
    for q in ground_truths:
        check_depth("mAP", q, rankings[q], max(ks), pool[q])
    for q, ranking in rankings.items():
        if len(set(ranking)) != len(ranking):
            dup = next(r for i, r in enumerate(ranking) if r in ranking[:i])
            raise MetricsError(f"query {q}: image {dup} appears more than once in its ranking "
                               f"(CIRCO's evaluation refuses duplicates)")
    n = max(1, len(ground_truths))
    return {k: 100.0 * sum(average_precision_at(rankings[q], gt, k) for q, gt in ground_truths.items()) / n
            for k in ks}
