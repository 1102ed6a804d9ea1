"""What keeping processed inputs (models.embedder.input_cache_rows) saves a fine-tuning
step, and that it changes nothing: MVFT-JI's joint loss (model/contrastive.py, what the
`finetune_embedder` worker computes) over the same batches for two epochs, with the
processor run on every batch and with each row's inputs kept after its first epoch.

    .venv/bin/python bench/input_cache.py RUN_DIR [BATCHES] [key=value ...]

RUN_DIR is a finished demo run (runs/demo after `make demo`): its captions, images,
triplets manifest and the embedder fine-tuning starts from (finetune_embedder.base).
BATCHES (default 40) batches of finetune_embedder.batch_size rows of each task. Prints
ms per step of each epoch, and whether the losses were equal bit for bit; backward runs,
the weights do not change (both runs see the same model).
"""
from __future__ import annotations

import json
import sys
import time

import lance
import pyarrow.parquet as pq
import torch

from model.contrastive import JointTasks, joint_loss
from model.mllm import FusedEmbedder
from ops.images import load_image
from pipelines.config import load_config, plain


def finetune_batches(cfg, batches: int) -> list[dict]:
    """`batches` of joint_loss's keyword arguments, finetune_embedder.batch_size rows of
    each task, from a finished demo run: the lake's captions and images, the triplets."""
    f, size = cfg.finetune_embedder, cfg.finetune_embedder.batch_size
    lake = cfg.storage.root
    captions = lance.dataset(f"{lake}/captions.lance").to_table(
        columns=["image_id", "sha256", f.caption_column]).to_pylist()
    uris = {r["image_id"]: r["uri"] for r in lance.dataset(f"{lake}/images.lance").to_table(
        columns=["image_id", "uri"]).to_pylist()}
    triplets = pq.read_table(cfg.catalogue.triplets).to_pylist()
    if min(len(captions), len(triplets)) < batches * size:
        raise SystemExit(f"{cfg.run_dir}: {len(captions)} captions and {len(triplets)} triplets, fewer than "
                         f"{batches} batches of {size}")
    rows = []
    for b in range(batches):
        c, t = captions[b * size:(b + 1) * size], triplets[b * size:(b + 1) * size]
        rows.append(dict(
            caption_texts=[r[f.caption_column] for r in c],
            caption_images=[load_image(uris[r["image_id"]], {}, cfg.images.alpha_background, r["sha256"]) for r in c],
            references=[load_image(r["source_uri"], {}, cfg.images.alpha_background) for r in t],
            modifications=[r["instruction"] for r in t],
            target_texts=[r["target_description"] for r in t],
            caption_image_keys=[r["sha256"] for r in c],
            reference_keys=[r["source_uri"] for r in t],
        ))
    return rows


def main(run_dir: str, batches: int, overrides: list[str]) -> dict:
    cfg = load_config(["conf/demo.yaml"], [f"run_dir={run_dir}", *overrides])
    f, size = cfg.finetune_embedder, cfg.finetune_embedder.batch_size
    conf = {**plain(cfg.models.embedder), "name_or_path": f.base, "dtype": f.dtype}
    kept_rows = conf["input_cache_rows"] or 4 * batches * size
    rows = finetune_batches(cfg, batches)
    tasks = JointTasks.from_conf(plain(f))
    out = {"batches": batches, "rows_a_step": 2 * size}
    losses = {}
    for name, cache in (("processed every step", 0), ("kept", kept_rows)):
        torch.manual_seed(cfg.seed)
        embedder = FusedEmbedder.from_conf({**conf, "input_cache_rows": cache})
        embedder.mllm.model.train()
        losses[name], times = [], []
        for _ in range(2):
            start = time.perf_counter()
            for b in rows:
                loss, _ = joint_loss(embedder, tasks, **b)
                loss.backward()
                losses[name].append(loss.item())
            times.append(round((time.perf_counter() - start) / batches * 1000, 1))
        out[name] = {"ms_a_step_epoch_1": times[0], "ms_a_step_epoch_2": times[1]}
        print(f"{name:>22}: {times[0]} ms a step in the first epoch, {times[1]} in the second", flush=True)
    out["same_losses"] = losses["kept"] == losses["processed every step"]
    out["saved_in_epoch_2"] = round(1 - out["kept"]["ms_a_step_epoch_2"]
                                    / out["processed every step"]["ms_a_step_epoch_2"], 3)
    print(json.dumps(out))
    return out


def run_cli(main, default_count: int, usage: str) -> None:
    """`RUN_DIR [COUNT] [key=value ...]` from the command line, to main(run_dir, count, overrides)."""
    args = sys.argv[1:]
    if not args:
        raise SystemExit(usage)
    count = int(args[1]) if len(args) > 1 and "=" not in args[1] else default_count
    main(args[0], count, [a for a in args[1:] if "=" in a])


if __name__ == "__main__":
    run_cli(main, 40, __doc__)
