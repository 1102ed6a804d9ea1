"""Exact top-k over a gallery that arrives in blocks: a running top-k, so that a gallery
larger than memory is searched with one block in memory at a time.

Scores are inner products: the gallery's vectors and the query vectors are unit
vectors, so the inner product is the cosine. A query may hold several vectors (the
samples of an ensemble kept apart, `sampling.aggregation: none`): its score for an
image is then the best of its samples' scores.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class RunningTopK:
    """Keeps, for B queries, the k best (score, gallery id) seen over all blocks so far."""

    def __init__(self, queries: np.ndarray, k: int, exclude: Sequence[str | None] | None = None):
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        self.queries = q if q.dim() == 3 else q.unsqueeze(1)  # (B, S, d)
        self.k = k
        self.exclude = list(exclude) if exclude is not None else [None] * len(q)
        b = self.queries.shape[0]
        self.scores = torch.full((b, 0), float("-inf"))
        self.ids = np.empty((b, 0), dtype=object)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        g = torch.as_tensor(np.array(vectors, dtype=np.float32))  # a copy: Arrow buffers are read-only
        if g.shape[1] != self.queries.shape[2]:
            raise ValueError(f"gallery vectors have size {g.shape[1]}, the queries {self.queries.shape[2]}")
        scores = torch.einsum("bsd,gd->bsg", self.queries, g).amax(dim=1)  # (B, G)
        ids = np.asarray(ids, dtype=object)
        if any(e is not None for e in self.exclude):
            pos = {image_id: j for j, image_id in enumerate(ids)}
            for i, e in enumerate(self.exclude):
                if e is not None and e in pos:
                    scores[i, pos[e]] = float("-inf")
        keep = min(self.k, scores.shape[1])
        top, idx = scores.topk(keep, dim=1)
        merged = torch.cat([self.scores, top], dim=1)
        merged_ids = np.concatenate([self.ids, ids[idx.numpy()]], axis=1)
        keep = min(self.k, merged.shape[1])
        self.scores, order = merged.topk(keep, dim=1)
        self.ids = np.take_along_axis(merged_ids, order.numpy(), axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(B, <=k) gallery ids and scores, best first; excluded and -inf entries dropped by the caller."""
        return self.ids, self.scores.numpy()
