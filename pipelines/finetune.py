"""Stage `finetune_embedder`: MVFT-JI's fine-tuning of the embedder f_M on Ray Train.

Two in-batch contrastive tasks trained jointly (model/contrastive.py): text-to-image,
from `captions` (each caption of an image's current bytes -> that image), and target
text, from the triplets manifest (reference image + instruction -> target description;
the rows an MLLM writes from unlabeled images in production). A third, not MVFT-JI's
(finetune_embedder.weight_pair_to_image), reads the text-to-image rows: each fused
(image, caption) pair -> its own image, which keeps Fusion-Diff's targets where the
gallery's images are. Each step takes
`finetune_embedder.batch_size` rows of each task, split over `train.num_workers`
workers; a worker's other rows are its negatives.

Resume, failures and logging are every training stage's (pipelines/ray_train.py): a run is Ray
Train's (storage, run_name), rerunning it continues from its newest checkpoint, and a
non-finite loss stops every worker at the same step with the last good checkpoint kept.
A checkpoint holds the trainable weights (all of them, or the LoRA matrices) and the
optimiser; the export, by worker 0 at the end, is a plain checkpoint of the base's
class (LoRA merged) with its processor, saved in models.embedder.dtype at
`finetune_embedder.output`, and a `finetune.json` whose digest enters the embedder's id
(model/mllm.py embedder_id), so that `embed` recomputes every vector after a new run.

Gradients are averaged over workers after the backward by one all-reduce of one flat
buffer (`average_gradients`), not by DDP: the embedder's forward goes through the base
model's submodules (FusedEmbedder), which a DDP wrapper around the model would not see.
The training loop is the one every Ray Train stage shares (pipelines/ray_train.py
`run_worker`); this module supplies the model, a batch's loss and the export.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import tempfile

import ray
import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file, save_file

from model.contrastive import JointTasks, joint_loss
from model.lora import add_lora, merge_lora
from model.mllm import FINETUNE_FILE, FusedEmbedder, torch_dtype
from model.training import OptimConfig
from ops.finetune import TARGET_TEXT_COLUMNS, TEXT_TO_IMAGE_COLUMNS, target_text_rows, text_to_image_rows
from ops.images import ImageRejected, load_image
from ops.storage import copy_dir
from ops.schemas import TRIPLET_COLUMNS
from pipelines.common import read_manifest, read_table
from pipelines.config import plain
from pipelines.context import RunContext, Summary
from pipelines.ray_train import (
    Trainable,
    TrainingError,
    dry_run_summary,
    faults_of,
    fit,
    in_key_order,
    plan_steps,
    resumable_state,
    run_summary,
    run_worker,
    training_seed,
    write_metrics,
)

TRAINABLE_FILE = "trainable.safetensors"
TASK_COLUMNS = {"text_to_image": TEXT_TO_IMAGE_COLUMNS, "target_text": TARGET_TEXT_COLUMNS}


def _embedder_conf(cfg, device: str) -> dict:
    """models.embedder with the base checkpoint, the training dtype and the worker's device."""
    f = cfg.finetune_embedder
    return {**plain(cfg.models.embedder), "name_or_path": f.base, "dtype": f.dtype, "device": device}


def _build_embedder(cfg, device: str) -> tuple[FusedEmbedder, list[torch.nn.Parameter], list[str]]:
    """The base embedder ready to train: (embedder, trainable parameters, their names)."""
    f = cfg.finetune_embedder
    embedder = FusedEmbedder.from_conf(_embedder_conf(cfg, device))
    model = embedder.mllm.model
    if f.lora_rank > 0:
        add_lora(model, list(f.lora_targets), f.lora_rank, f.lora_alpha)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return embedder, [p for _, p in named], [n for n, _ in named]


def _load_images(uris: list[str], shas: list[str], s3: dict, background: str) -> list:
    try:
        return [load_image(u, s3, background, s) for u, s in zip(uris, shas)]
    except ImageRejected as e:
        raise TrainingError(f"finetune_embedder: {e}") from None


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """The workers' gradients averaged in one all-reduce per dtype over one flat buffer
    (a parameter a batch left unused counts as zeros), not one call per tensor."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for dtype in {g.dtype for g in grads}:
        group = [i for i, g in enumerate(grads) if g.dtype == dtype]
        flat = torch.cat([grads[i].reshape(-1) for i in group])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for i in group:
            n = grads[i].numel()
            params[i].grad = flat[offset:offset + n].view_as(grads[i])
            offset += n


def _export(cfg, embedder: FusedEmbedder, state: dict) -> None:
    """The fine-tuned embedder as a plain checkpoint at finetune_embedder.output."""
    f, model = cfg.finetune_embedder, embedder.mllm.model
    merge_lora(model)
    model.to(torch_dtype(cfg.models.embedder.dtype))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        embedder.mllm.processor.save_pretrained(d)
        with open(os.path.join(d, FINETUNE_FILE), "w") as out:
            json.dump({"base": f.base, "run": f.run_name, "step": state["step"],
                       "storage": cfg.train.storage}, out)
        copy_dir(d, f.output, plain(cfg.storage.s3))


class FinetuneStage(Trainable):
    """MVFT-JI's fine-tuning in a worker: what the shared loop (pipelines/ray_train.py
    run_worker) asks of a stage. A step's images are read and decoded in a thread while
    the step before it runs."""

    stage = label = "finetune_embedder"
    prefetch = True

    def __init__(self, cfg, config: dict, device, rank: int, world: int):
        f = self.f = cfg.finetune_embedder
        self.cfg, self.device, self.world, self.run_name = cfg, device, world, f.run_name
        self.tasks_read = list(config["shards"])
        self.batch_size, self.samples_per_step = f.batch_size, f.batch_size * len(self.tasks_read)
        self.s3, self.background = plain(cfg.storage.s3), cfg.images.alpha_background
        torch.manual_seed(training_seed(cfg))  # LoRA's A matrices: the same in every run of this config
        self.embedder, self.params, self.names = _build_embedder(cfg, str(device))
        self.optim = OptimConfig.from_conf(plain(f))
        self.tasks = JointTasks.from_conf(plain(f))
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16,
                             enabled=cfg.train.use_gpu and cfg.train.autocast_bf16)

    def load(self, directory: str) -> None:
        saved = load_file(os.path.join(directory, TRAINABLE_FILE))
        if sorted(saved) != sorted(self.names):
            raise TrainingError(
                f"run {self.f.run_name!r} under {self.cfg.train.storage} was checkpointed with other "
                f"trainable weights ({len(saved)} tensors, this config trains {len(self.names)}: "
                f"lora_rank or lora_targets changed): choose another finetune_embedder.run_name"
            )
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(saved[n])

    def epoch_batches(self, shards: dict, per_worker: int, shuffle_seed: int):
        streams = [shards[t].iter_batches(batch_size=per_worker, batch_format="pandas", drop_last=True,
                                          local_shuffle_buffer_size=self.cfg.train.shuffle_buffer or None,
                                          local_shuffle_seed=shuffle_seed)
                   for t in self.tasks_read]
        # Every shard is read to its end each epoch; a step pairs the i-th batches of the
        # tasks, up to the smaller task's count.
        for batches in itertools.zip_longest(*streams):
            yield None if any(b is None for b in batches) else dict(zip(self.tasks_read, batches))

    def prepare(self, rows: dict) -> dict:
        t2i, tt = rows.get("text_to_image"), rows.get("target_text")
        return {"t2i": t2i, "tt": tt,
                "caption_images": [] if t2i is None else _load_images(
                    list(t2i["image_uri"]), list(t2i["image_sha256"]), self.s3, self.background),
                "references": [] if tt is None else _load_images(
                    list(tt["source_uri"]), list(tt["source_sha256"]), self.s3, self.background)}

    def step(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        t2i, tt = batch["t2i"], batch["tt"]
        with torch.autocast(**self.autocast):
            loss, parts = joint_loss(
                self.embedder, self.tasks,
                caption_texts=[] if t2i is None else list(t2i["text"]),
                caption_images=batch["caption_images"],
                references=batch["references"],
                modifications=[] if tt is None else list(tt["instruction"]),
                target_texts=[] if tt is None else list(tt["target_description"]),
                caption_image_keys=None if t2i is None else list(t2i["image_sha256"]),
                reference_keys=None if tt is None else list(tt["source_sha256"]),
            )
        loss.backward()
        average_gradients(self.params, self.world)
        return loss.detach(), parts

    def save(self, directory: str) -> None:
        save_file({n: p.detach().contiguous().cpu() for n, p in zip(self.names, self.params)},
                  os.path.join(directory, TRAINABLE_FILE))

    def finish(self, state: dict) -> None:
        _export(self.cfg, self.embedder, state)


def _datasets(ctx: RunContext) -> dict[str, ray.data.Dataset]:
    """Each task with a weight above 0: its rows, as Ray Data datasets."""
    cfg, lake = ctx.cfg, ctx.lake
    f = cfg.finetune_embedder
    out = {}
    if f.weight_text_to_image > 0 or f.weight_pair_to_image > 0:
        captions = read_table(lake, "captions", ["image_id", "sha256", f.caption_column])
        out["text_to_image"] = captions.map_batches(
            text_to_image_rows, batch_format="pyarrow",
            fn_kwargs=dict(tables=lake, caption_column=f.caption_column),
        ).select_columns(TEXT_TO_IMAGE_COLUMNS)
    if f.weight_target_text > 0:
        triplets = read_manifest(cfg.catalogue.triplets, lake.s3, required=TRIPLET_COLUMNS, optional=(),
                                 what="triplets")
        out["target_text"] = triplets.map_batches(
            target_text_rows, batch_format="pyarrow", fn_kwargs=dict(tables=lake, limits=ctx.conf["images"])
        )
    return out


def run(ctx: RunContext, faults: dict | None = None) -> Summary:
    """Fine-tunes the embedder on Ray Train; `faults` (or the FAULTS_ENV variable)
    injects the drills' failures."""
    cfg = ctx.cfg
    f, tc = cfg.finetune_embedder, cfg.train
    summary = Summary("finetune_embedder")
    ctx.start_ray()
    lake = ctx.lake
    ctx.require(f"finetune_embedder ({tc.num_workers} workers)", tc.num_workers * tc.cpus_per_worker,
                tc.num_workers if tc.use_gpu else 0,
                "train.num_workers, train.cpus_per_worker, train.use_gpu")
    # Kept whatever their size (a text and an image's uri a row), sorted by every column.
    datasets = {t: in_key_order(ds, TASK_COLUMNS[t], tc.key_order_rows_per_block)
                for t, ds in _datasets(ctx).items()}
    counts = {t: ds.count() for t, ds in datasets.items()}
    needs = {"text_to_image": "`caption` (captions of the images' current bytes)",
             "target_text": f"readable triplets in {cfg.catalogue.triplets}"}
    for t, n in counts.items():
        if n < f.batch_size:
            raise TrainingError(f"finetune_embedder: {n} {t.replace('_', '-')} rows, fewer than one batch "
                                f"(finetune_embedder.batch_size={f.batch_size}): needs {needs[t]}")
    per_epoch, total = plan_steps(min(counts.values()), f.batch_size, f.epochs, f.max_steps)
    _, before = resumable_state(tc.storage, f.run_name, "finetune_embedder", "finetune_embedder.run_name",
                                lake.s3)
    summary.read = sum(counts.values())
    summary.extra.update({f"{t}_rows": n for t, n in counts.items()})
    if ctx.dry_run:
        return dry_run_summary(summary, per_epoch, before, total)
    print(f"[finetune_embedder] {', '.join(f'{n} {t} rows' for t, n in counts.items())}, {per_epoch} steps "
          f"an epoch, {total} steps, {tc.num_workers} worker(s); run {tc.storage}/{f.run_name}", flush=True)
    loop_config = {"cfg": ctx.conf, "total_steps": total, "steps_per_epoch": per_epoch,
                   "shards": list(datasets), "faults": faults_of(faults)}
    checkpoint = fit(functools.partial(run_worker, FinetuneStage), loop_config, tc, f.run_name, datasets,
                     lake.s3, "finetune_embedder", verbose=cfg.log.verbose)
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, "train_state.json")) as fh:
            state = json.load(fh)
    write_metrics(f.output, state["metrics"], "finetune_embedder: contrastive loss", lake.s3)
    run_summary(summary, before, state, total)
    used = cfg.models.embedder.name_or_path == f.output
    summary.note = f"embedder: {f.output} " + (
        "(models.embedder loads it: embed re-embeds)" if used
        else "(point models.embedder.name_or_path there to embed with it)")
    return summary
