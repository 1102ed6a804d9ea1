"""Exact against approximate gallery search: queries/s and recall@10 of the ANN index.

Random unit vectors (default 100k x 1536, d_VL of the paper) written as a Lance
`embeddings` table, queries near gallery items (a gallery vector plus noise, as a
composed query is near its target), searched through the rank stage's own
GallerySearch: exact (blocked scan, running top-k) and the `index` stage's LanceDB
index. Prints one JSON line per method and a last summary line. Besides recall@10
against exact search it reports how often each method finds the planted item: in
random high-dimensional data the other nine exact neighbours are at noise level
(cosine ~0 +- 1/sqrt(d)), so recall against them says little about a real catalogue.

    .venv/bin/python bench/search_speed.py [--n 100000 --dim 1536 --queries 200]
    .venv/bin/python bench/search_speed.py --queries 1000 rank.search_batch_size=1000   # the scan's rate
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import lance
import numpy as np
import pyarrow as pa


def main() -> None:
    from ops.rank import GallerySearch
    from ops.schemas import embeddings_schema, query_vectors_schema
    from pipelines.config import load_config, plain
    from pipelines.context import RunContext
    from pipelines.lake import Lake
    from pipelines.registry import STAGES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("overrides", nargs="*", help="index.* / rank.* overrides")
    args = ap.parse_intermixed_args()
    root = tempfile.mkdtemp(prefix="search_bench_")
    cfg = load_config("conf/demo.yaml", [f"run_dir={root}", f"models.embedder.dim={args.dim}", "rank.mode=query_only",
                                         "rank.top_k=10", "rank.exclude_reference=false", "index.min_rows=1",
                                         *args.overrides])
    rng = np.random.default_rng(0)
    d, n, q = args.dim, args.n, args.queries

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    t = time.perf_counter()
    schema = embeddings_schema(d)

    def batches():
        for s in range(0, n, 10_000):
            m = min(10_000, n - s)
            vec = unit(rng.standard_normal((m, d)))
            yield pa.record_batch([pa.array([f"g{i:07d}" for i in range(s, s + m)]), pa.array(["image"] * m),
                                   pa.array(["x"] * m), pa.array(["m"] * m), pa.nulls(m, pa.string()),
                                   pa.nulls(m, pa.string()),
                                   pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), d)], schema=schema)

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), f"{cfg.storage.root}/embeddings.lance")
    targets = rng.choice(n, q, replace=False)
    gal = lance.dataset(f"{cfg.storage.root}/embeddings.lance").take(targets, columns=["vector"])
    tv = gal.column("vector").combine_chunks().values.to_numpy().reshape(q, d)
    qv = unit(tv + 0.5 * unit(rng.standard_normal((q, d))))
    lance.write_dataset(pa.table({
        "query_id": [f"q{i}" for i in range(q)], "mode": ["query_only"] * q, "query_key": ["k"] * q,
        "reference_id": pa.nulls(q, pa.string()), "reference_uri": pa.nulls(q, pa.string()),
        "reference_sha256": pa.nulls(q, pa.string()), "modification_text": ["t"] * q,
        "shared_concept": pa.nulls(q, pa.string()), "description": pa.nulls(q, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(qv.reshape(-1)), d)}, schema=query_vectors_schema(d)),
        f"{cfg.storage.root}/query_vectors.lance")
    print(json.dumps({"written_s": round(time.perf_counter() - t, 1), "gallery": n, "dim": d}), flush=True)
    t = time.perf_counter()
    line = STAGES["index"].run(RunContext.create(cfg)).line()
    print(json.dumps({"index": line, "index_build_s": round(time.perf_counter() - t, 1)}), flush=True)
    batch = pa.table({"query_id": [f"q{i}" for i in range(q)], "query_key": ["k"] * q,
                      "reference_id": pa.nulls(q, pa.string()), "reject_reason": pa.nulls(q, pa.string())})
    results = {}
    for method in ("exact", "ann"):
        search = GallerySearch(plain(cfg), Lake.from_conf(cfg), method)
        t = time.perf_counter()
        out = search(batch)
        secs = time.perf_counter() - t
        results[method] = (out, q / secs)
        print(json.dumps({"method": method, "queries_per_s": round(q / secs, 1)}), flush=True)

    def pairs(t):
        return set(zip(t.column("query_id").to_pylist(), t.column("image_id").to_pylist()))

    recall = len(pairs(results["exact"][0]) & pairs(results["ann"][0])) / (10 * q)
    # The physical limit of this machine for the exact scan: NumPy's own matrix product
    # (BLAS) on one gallery block of the same shape, against the scan's effective rate.
    block = min(n, cfg.rank.gallery_block)
    g = unit(rng.standard_normal((block, d)))
    qm = qv.astype(np.float32)
    t = time.perf_counter()
    qm @ g.T
    matmul_gflops = 2 * q * block * d / (time.perf_counter() - t) / 1e9
    exact_gflops = 2 * n * d * results["exact"][1] / 1e9
    def planted(t):
        """Share of queries whose planted gallery item (the one the query was drawn near) is in their top 10."""
        got = set(zip(t.column("query_id").to_pylist(), t.column("image_id").to_pylist()))
        return sum((f"q{i}", f"g{targets[i]:07d}") in got for i in range(q)) / q
    print(json.dumps({"gallery": n, "dim": d, "queries": q, "exact_queries_per_s": round(results["exact"][1], 1),
                      "ann_queries_per_s": round(results["ann"][1], 1), "ann_recall_at_10_vs_exact": round(recall, 3),
                      "exact_finds_planted": round(planted(results["exact"][0]), 3),
                      "ann_finds_planted": round(planted(results["ann"][0]), 3), "nprobes": cfg.index.nprobes,
                      "refine_factor": cfg.index.refine_factor, "exact_gflop_per_s": round(exact_gflops, 1),
                      "numpy_matmul_gflop_per_s": round(matmul_gflops, 1),
                      "exact_share_of_matmul": round(exact_gflops / matmul_gflops, 2)}))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
