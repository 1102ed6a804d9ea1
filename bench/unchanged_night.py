"""What a night costs when nothing changed, at two catalogue sizes.

For each size N: N small PNG files and a manifest; a first night of the real `ingest`
(every image read, hashed, probed); `captions` and `embeddings` filled through the
lake's own commit with rows that match what the stages compare (the captioner's name,
the embedder id, each image's pair text from ops.embed.attach_captions; the vectors are
random: no model could caption 100k images on 2 cores in a benchmark), so that caption
and embed find nothing to do exactly as after real runs; 100 queries ranked once
(`query_only`, exact search). Then the unchanged night, timed per stage in one Ray
session: ingest (stats only), caption, embed, rank (inputs unchanged: republishes).
Every stage of the unchanged night must write nothing new, or the script stops.
Last, a night where 1% of the images left the manifest: ingest alone (it deletes them
from `images`, `captions` and `embeddings`, one keyed commit a table), timed, and the
tables' rows checked to have lost exactly those images.

    .venv/bin/python bench/unchanged_night.py [--sizes 10000 100000 --queries 100]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_images(folder: str, n: int) -> list[str]:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    uris = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        path = f"{folder}/{i:07d}.png"
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        uris.append(path)
    return uris


def fill_model_tables(cfg, lake) -> None:
    """captions and embeddings rows for every image, as the stages would have left them."""
    from model.mllm import embedder_id
    from ops.embed import attach_captions
    from ops.schemas import CAPTIONS, embeddings_schema
    from pipelines.config import plain
    from pipelines.lake import _upsert

    images = lake.open("images").to_table(columns=["image_id", "sha256"])
    n = images.num_rows
    captions = pa.table({"image_id": images["image_id"], "sha256": images["sha256"],
                         "caption_long": [f"a long caption {i}" for i in range(n)],
                         "caption_short": [f"short {i}" for i in range(n)],
                         "caption_short_source": ["model"] * n,
                         "model": [cfg.models.captioner.name_or_path] * n}, schema=CAPTIONS)
    _upsert(lake, "captions", ["image_id"], CAPTIONS, captions.to_reader())
    paired = attach_captions(images, lake, cfg.embed.pair_short_fraction)
    dim, model = cfg.models.embedder.dim, embedder_id(plain(cfg)["models"]["embedder"])
    schema = embeddings_schema(dim)
    rng = np.random.default_rng(1)

    def rows(kind, text, caption_kind):
        v = rng.standard_normal((n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return pa.table({"image_id": paired["image_id"], "kind": [kind] * n, "sha256": paired["sha256"],
                         "model": [model] * n, "text": text, "caption_kind": caption_kind,
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)}, schema=schema)

    table = pa.concat_tables([rows("image", pa.nulls(n, pa.string()), pa.nulls(n, pa.string())),
                              rows("pair", paired["pair_text"], paired["pair_caption_kind"])])
    _upsert(lake, "embeddings", ["image_id", "kind"], schema, table.to_reader())


def one_size(n: int, n_queries: int, models: dict) -> dict:
    from pipelines.config import load_config
    from pipelines.context import RunContext, init_ray
    from pipelines.lake import Lake
    from pipelines.registry import STAGES

    root = tempfile.mkdtemp(prefix=f"unchanged_{n}_")
    t = time.perf_counter()
    uris = write_images(f"{root}/images", n)
    ids = [f"img{i:07d}" for i in range(n)]
    pq.write_table(pa.table({"image_id": ids, "uri": uris}), f"{root}/manifest.parquet")
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in range(n_queries)],
                             "reference_id": ids[:n_queries],
                             "modification_text": ["make it red"] * n_queries}), f"{root}/queries.parquet")
    files_s = time.perf_counter() - t
    cfg = load_config("conf/demo.yaml", [
        f"run_dir={root}", f"catalogue.manifest={root}/manifest.parquet",
        f"catalogue.queries={root}/queries.parquet", "rank.mode=query_only", "ray.progress_bars=false",
        "ingest.batch_size=1024", *(f"models.{k}.name_or_path={v}" for k, v in models.items())])
    init_ray(cfg)
    lake = Lake.from_conf(cfg)

    def night(run_id: str) -> dict:
        out = {}
        for stage in ("ingest", "caption", "embed", "rank"):
            t = time.perf_counter()
            s = STAGES[stage].run(RunContext.create(cfg, run_id))
            out[stage] = {"s": round(time.perf_counter() - t, 2), "written": s.written, "skipped": s.skipped,
                          **({"reused_run": s.extra.get("reused_run")} if stage == "rank" else {})}
        return out

    t = time.perf_counter()
    first_ingest = STAGES["ingest"].run(RunContext.create(cfg, "night0"))
    first_ingest_s = time.perf_counter() - t
    fill_model_tables(cfg, lake)
    t = time.perf_counter()
    STAGES["rank"].run(RunContext.create(cfg, "night0"))
    first_rank_s = time.perf_counter() - t
    unchanged = night("night1")
    for stage, r in unchanged.items():
        if r["written"] and stage != "rank" or stage == "rank" and r["reused_run"] != "night0":
            raise SystemExit(f"the unchanged night did work in {stage}: {r}")
    kept = [i for k, i in enumerate(ids) if k % 100]  # 1% leave the catalogue
    pq.write_table(pa.table({"image_id": kept, "uri": [u for k, u in enumerate(uris) if k % 100]}),
                   f"{root}/manifest.parquet")
    t = time.perf_counter()
    gone = STAGES["ingest"].run(RunContext.create(cfg, "night2"))
    deletion_s = time.perf_counter() - t
    rows = {name: lake.open(name).count_rows() for name in ("images", "captions", "embeddings")}
    if gone.written or rows != {"images": len(kept), "captions": len(kept), "embeddings": 2 * len(kept)}:
        raise SystemExit(f"the deletion night left {rows} (wrote {gone.written}); expected {len(kept)} images")
    return {"images": n, "queries": n_queries, "deleted": gone.extra["deleted"],
            "deletion_ingest_s": round(deletion_s, 2), "write_files_s": round(files_s, 1),
            "first_ingest_s": round(first_ingest_s, 1), "first_ingest_written": first_ingest.written,
            "first_rank_s": round(first_rank_s, 1), "unchanged_night": unchanged,
            "unchanged_total_s": round(sum(r["s"] for r in unchanged.values()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    from pipelines.config import load_config
    from pipelines.synthetic import build_demo_models

    models_dir = tempfile.mkdtemp(prefix="unchanged_models_")
    cfg = load_config("conf/demo.yaml", [f"run_dir={models_dir}"])
    build_demo_models(cfg)
    models = {role: cfg.models[role].name_or_path for role in ("captioner", "embedder", "describer", "text_encoder")}
    results = []
    for n in args.sizes:
        results.append(one_size(n, args.queries, models))
        print(json.dumps(results[-1]), flush=True)
    print("\n| images | first ingest (reads all) | unchanged: ingest | caption | embed | rank | total "
          "| 1% deleted: ingest |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        u = r["unchanged_night"]
        print(f"| {r['images']:,} | {r['first_ingest_s']} s | {u['ingest']['s']} s | {u['caption']['s']} s | "
              f"{u['embed']['s']} s | {u['rank']['s']} s | {r['unchanged_total_s']} s | "
              f"{r['deletion_ingest_s']} s ({r['deleted']:,} images) |")


if __name__ == "__main__":
    main()
