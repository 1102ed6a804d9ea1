"""MVFT-JI's claim on the synthetic world: the fine-tuned embedder retrieves a composed
query's target better than the embedder it started from.

Draws the synthetic catalogue (images, edit triplets, composed queries whose reference
and target are catalogue images), runs ingest, caption and `finetune_embedder` (the
text-to-image task on the manifest's true captions, `caption_short`, so that the
captioner's quality does not enter), then ranks every catalogue image for each query by
f_M(reference, modification) . f_M(image) (the `query_only` scoring), the reference
left out, with the base and the fine-tuned embedder. The triplets are drawn apart from
the queries (other random items and edits); the queries are never trained on.

Prints a table, then as its last line one JSON object:
{"base": {"R@1": ..., "R@5": ..., "R@10": ...}, "finetuned": {...}, "chance": {...}, ...}

    .venv/bin/python bench/finetune_quality.py [key=value ...]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import pyarrow.parquet as pq
import torch

from model.mllm import FusedEmbedder
from ops.images import load_image
from ops.metrics import recall_at
from pipelines.api import run_stage
from pipelines.config import load_config, plain

KS = (1, 5, 10)
DEFAULTS = [
    "synthetic.num_images=240", "synthetic.num_triplets=160", "synthetic.num_queries=60",
    "finetune_embedder.caption_column=caption_short", "finetune_embedder.epochs=8",
    "train.log_every=10", "ray.progress_bars=false",
]


def recalls(embedder: FusedEmbedder, manifest: dict, queries: list[dict], background: str,
            batch: int = 16) -> dict[str, float]:
    ids = list(manifest)
    images = {i: load_image(manifest[i], None, background) for i in ids}
    gallery = torch.cat([embedder.embed(images=[images[i] for i in ids[lo:lo + batch]])
                         for lo in range(0, len(ids), batch)])
    q = torch.cat([embedder.embed(images=[images[r["reference_id"]] for r in queries[lo:lo + batch]],
                                  texts=[r["modification_text"] for r in queries[lo:lo + batch]], side="query")
                   for lo in range(0, len(queries), batch)])
    order = (q @ gallery.t()).argsort(dim=1, descending=True)
    rankings = {r["query_id"]: [ids[j] for j in order[n].tolist()] for n, r in enumerate(queries)}
    targets = {r["query_id"]: r["target_id"] for r in queries}
    exclude = {r["query_id"]: r["reference_id"] for r in queries}
    got = recall_at(rankings, targets, KS, {k: len(ids) - 1 for k in targets}, exclude=exclude)
    return {f"R@{k}": round(v, 2) for k, v in got.items()}


def main(argv: list[str]) -> dict:
    run_dir = tempfile.mkdtemp(prefix="finetune_quality_")
    cfg = load_config("conf/demo.yaml", [f"run_dir={run_dir}", *DEFAULTS, *argv])
    started = time.monotonic()
    for stage in ("synth", "ingest", "caption", "finetune_embedder"):
        print(run_stage(stage, cfg).line(), flush=True)
    trained_s = time.monotonic() - started
    manifest = {r["image_id"]: r["uri"] for r in pq.read_table(cfg.catalogue.manifest).to_pylist()}
    queries = pq.read_table(cfg.catalogue.queries).to_pylist()
    conf = plain(cfg.models.embedder)
    result = {}
    for name, path in (("base", cfg.finetune_embedder.base), ("finetuned", cfg.finetune_embedder.output)):
        result[name] = recalls(FusedEmbedder.from_conf({**conf, "name_or_path": path}), manifest, queries,
                               cfg.images.alpha_background)
    result["chance"] = {f"R@{k}": round(100.0 * k / (len(manifest) - 1), 2) for k in KS}
    result.update(images=len(manifest), queries=len(queries), steps=None, seconds=round(trained_s, 1))
    with open(os.path.join(cfg.finetune_embedder.output, "metrics.jsonl")) as f:
        result["steps"] = [json.loads(line) for line in f][-1]["step"]
    print(f"\n{len(queries)} composed queries over {len(manifest)} images "
          f"(query_only scoring; the reference left out); {result['steps']} fine-tuning steps")
    print("| embedder | " + " | ".join(f"R@{k}" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    for name in ("chance", "base", "finetuned"):
        print(f"| {name} | " + " | ".join(f"{result[name][f'R@{k}']:.2f}" for k in KS) + " |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
