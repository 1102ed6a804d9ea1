"""The three benchmarks' metrics, computed as their official code computes them, from rankings.

A ranking is a query's image ids, best first (the rankings file's rows of that query
sorted by rank). Values are percentages.

- CIRR (Liu et al., 2021, `cirr` repo): Recall@K with the reference image removed from
  the ranking; Recall_subset@K ranks only the query's img_set members, reference removed.
  From a top-k file a subset member that is absent from the ranking counts as ranked
  after every present one, so a target absent from the file is a miss at every K.
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


def recall_at(rankings: Mapping[str, Sequence[str]], targets: Mapping[str, str], ks: Iterable[int],
              exclude: Mapping[str, str] | None = None) -> dict[int, float]:
    """Share of queries (in %) whose target is in the top K, `exclude[q]` removed first."""
    ks = list(ks)
    hits = {k: 0 for k in ks}
    for q, target in targets.items():
        ranked = _without(rankings[q], (exclude or {}).get(q))
        pos = ranked.index(target) if target in ranked else None
        for k in ks:
            hits[k] += pos is not None and pos < k
    n = max(1, len(targets))
    return {k: 100.0 * hits[k] / n for k in ks}


def recall_subset_at(rankings: Mapping[str, Sequence[str]], targets: Mapping[str, str],
                     members: Mapping[str, Sequence[str]], references: Mapping[str, str],
                     ks: Iterable[int]) -> dict[int, float]:
    """CIRR's Recall_subset@K: the ranking restricted to the img_set members minus the reference."""
    restricted = {}
    for q in targets:
        subset = set(members[q]) - {references[q]}
        restricted[q] = [r for r in rankings[q] if r in subset]
    return recall_at(restricted, targets, ks)


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
           ks: Iterable[int]) -> dict[int, float]:
    for q, ranking in rankings.items():
        if len(set(ranking)) != len(ranking):
            dup = next(r for i, r in enumerate(ranking) if r in ranking[:i])
            raise MetricsError(f"query {q}: image {dup} appears more than once in its ranking "
                               f"(CIRCO's evaluation refuses duplicates)")
    ks = list(ks)
    n = max(1, len(ground_truths))
    return {k: 100.0 * sum(average_precision_at(rankings[q], gt, k) for q, gt in ground_truths.items()) / n
            for k in ks}
