"""Exact top-k over a gallery that arrives in blocks: a running top-k, so that a gallery
larger than memory is searched with one block in memory at a time.

Scores are inner products: the gallery's vectors and the query vectors are unit
vectors, so the inner product is the cosine. A query may hold several vectors (the
samples of an ensemble kept apart, `sampling.aggregation: none`): its score for an
image is then the best of its samples' scores.

Each block is one matrix product (all queries x all samples against the block, on the
GPU when there is one) and one `topk`; the excluded references are found with Arrow's
vectorised `index_in`, and gallery ids are only looked up for the k winners of a block,
so no per-row Python runs: the work is the product, as the figures in
docs/benchmarks.md show against the machine's matmul rate.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


def search_device(name: str) -> torch.device:
    """conf `rank.search_device`: auto is the GPU when the actor has one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class RunningTopK:
    """Keeps, for B queries, the k best (score, gallery id) seen over all blocks so far."""

    def __init__(self, queries: np.ndarray, k: int, exclude: Sequence[str | None] | None = None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        q = q if q.dim() == 3 else q.unsqueeze(1)  # (B, S, d)
        self.batch, self.samples, self.dim = q.shape
        self.flat = q.reshape(-1, self.dim)  # (B*S, d): one product for every sample
        self.k = k
        exclude = list(exclude) if exclude is not None else [None] * self.batch
        self.excluded = [i for i, e in enumerate(exclude) if e is not None]
        self.exclude_ids = pa.array([exclude[i] for i in self.excluded], pa.string())
        self.scores = torch.full((self.batch, 0), float("-inf"), device=self.device)
        self.ids = np.empty((self.batch, 0), dtype=object)

    def add(self, ids: Sequence[str] | pa.Array, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"gallery vectors have shape {vectors.shape}, the queries size {self.dim}")
        with warnings.catch_warnings():
            # Arrow's buffers are read-only and are only read here: no copy (a copy of a
            # 65,536 x 1,536 block costs a sixth of its product).
            warnings.simplefilter("ignore", UserWarning)
            g = torch.as_tensor(vectors).to(self.device, non_blocking=True)
        scores = self.flat @ g.T
        if self.samples > 1:
            scores = scores.view(self.batch, self.samples, -1).amax(dim=1)  # (B, G)
        ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
        if self.excluded:
            # Where each query's reference sits in this block (null: not in it).
            where = pc.index_in(self.exclude_ids, value_set=ids).to_numpy(zero_copy_only=False)
            hit = ~np.isnan(where.astype(float))
            if hit.any():
                rows = torch.as_tensor(np.asarray(self.excluded)[hit], device=self.device)
                cols = torch.as_tensor(where[hit].astype(np.int64), device=self.device)
                scores[rows, cols] = float("-inf")
        top, idx = scores.topk(min(self.k, scores.shape[1]), dim=1)
        idx = idx.cpu().numpy()
        top_ids = ids.take(pa.array(idx.ravel())).to_numpy(zero_copy_only=False).reshape(idx.shape)
        merged = torch.cat([self.scores, top], dim=1)
        self.scores, order = merged.topk(min(self.k, merged.shape[1]), dim=1)
        merged_ids = np.concatenate([self.ids, top_ids], axis=1)
        self.ids = np.take_along_axis(merged_ids, order.cpu().numpy(), axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(B, <=k) gallery ids and scores, best first; excluded and -inf entries dropped by the caller."""
        return self.ids, self.scores.cpu().numpy()
