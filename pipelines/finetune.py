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

Resume, failures and logging are `train_stage1`'s (pipelines/train.py): a run is Ray
Train's (storage, run_name), rerunning it continues from its newest checkpoint, and a
non-finite loss stops every worker at the same step with the last good checkpoint kept.
A checkpoint holds the trainable weights (all of them, or the LoRA matrices) and the
optimiser; the export, by worker 0 at the end, is a plain checkpoint of the base's
class (LoRA merged) with its processor, saved in models.embedder.dtype at
`finetune_embedder.output`, and a `finetune.json` whose digest enters the embedder's id
(model/mllm.py embedder_id), so that `embed` recomputes every vector after a new run.

Gradients are averaged over workers by one all-reduce per parameter after the
backward, not by DDP: the embedder's forward goes through the base model
(FusedEmbedder), which DDP's wrapper would not see.
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from model.contrastive import JointTasks, joint_loss
from model.lora import add_lora, merge_lora
from model.mllm import FINETUNE_FILE, FusedEmbedder, load_mllm_from_conf, torch_dtype
from model.training import (
    OptimConfig,
    apply_step,
    load_training_state,
    make_optimizer,
    make_scheduler,
    save_training_state,
)
from ops.finetune import TARGET_TEXT_COLUMNS, TEXT_TO_IMAGE_COLUMNS, target_text_rows, text_to_image_rows
from ops.images import ImageRejected, load_image
from ops.storage import copy_dir
from ops.schemas import TRIPLET_COLUMNS
from pipelines.common import read_manifest, read_table
from pipelines.config import plain
from pipelines.context import RunContext, Summary
from pipelines.ray_train import (
    FAULTS_ENV,
    TrainingError,
    finite_mean,
    fit,
    in_key_order,
    maybe_inject_failure,
    resumable_state,
    training_seed,
    write_metrics,
    write_stop,
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


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world


def _save_checkpoint(params, names, opt, sched, state: dict, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        save_file({n: p.detach().contiguous().cpu() for n, p in zip(names, params)},
                  os.path.join(d, TRAINABLE_FILE))
        save_training_state(d, opt, sched, None, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


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


def train_loop(config: dict) -> None:
    cfg = OmegaConf.create(config["cfg"])
    total, per_epoch, faults = config["total_steps"], config["steps_per_epoch"], config["faults"]
    f, tc = cfg.finetune_embedder, cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    s3 = plain(cfg.storage.s3)

    seed = training_seed(cfg)
    torch.manual_seed(seed)  # LoRA's A matrices: the same in every run of this config
    embedder, params, names = _build_embedder(cfg, str(device))
    optim = OptimConfig.from_conf(plain(f))
    opt = make_optimizer(params, optim, fused=tc.fused_optimizer)
    sched = make_scheduler(opt, optim, total)
    state = {"stage": "finetune_embedder", "step": 0, "metrics": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = load_file(os.path.join(d, TRAINABLE_FILE))
            if sorted(saved) != sorted(names):
                raise TrainingError(
                    f"run {f.run_name!r} under {tc.storage} was checkpointed with other trainable weights "
                    f"({len(saved)} tensors, this config trains {len(names)}: lora_rank or lora_targets "
                    f"changed): choose another finetune_embedder.run_name"
                )
            with torch.no_grad():
                for n, p in zip(names, params):
                    p.copy_(saved[n])
            state = load_training_state(d, opt, sched, None)
        state.setdefault("resumes", []).append(state["step"])
        if rank == 0:
            print(f"[finetune_embedder] resuming at step {state['step']}/{total}", flush=True)
    tasks = JointTasks.from_conf(plain(f))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=tc.use_gpu and tc.autocast_bf16)
    per_worker = f.batch_size // world
    shards = {t: ray.train.get_dataset_shard(t) for t in config["tasks"]}
    tick, last_loss = time.perf_counter(), None
    while state["step"] < total:
        start_step, skip = state["step"], state["step"] % per_epoch
        epoch_seed = seed * 1_000_003 + state["step"] // per_epoch
        streams = [
            shards[t].iter_batches(batch_size=per_worker, batch_format="pandas", drop_last=True,
                                   local_shuffle_buffer_size=tc.shuffle_buffer or None,
                                   local_shuffle_seed=epoch_seed)
            for t in config["tasks"]
        ]
        # Both shards are read to their end every epoch (Ray Data's split expects it);
        # steps pair the i-th batches of the tasks, up to the smaller task's count.
        for i, batches in enumerate(itertools.zip_longest(*streams)):
            if i < skip or i >= per_epoch or state["step"] >= total or any(b is None for b in batches):
                continue
            step = state["step"]
            rows = dict(zip(config["tasks"], batches))
            maybe_inject_failure(cfg.run_dir, faults, f"finetune_{f.run_name}", step, rank, world)
            t2i, tt = rows.get("text_to_image"), rows.get("target_text")
            with torch.autocast(**autocast):
                loss, parts = joint_loss(
                    embedder, tasks,
                    caption_texts=[] if t2i is None else list(t2i["text"]),
                    caption_images=[] if t2i is None else _load_images(
                        list(t2i["image_uri"]), list(t2i["image_sha256"]), s3, cfg.images.alpha_background),
                    references=[] if tt is None else _load_images(
                        list(tt["source_uri"]), list(tt["source_sha256"]), s3, cfg.images.alpha_background),
                    modifications=[] if tt is None else list(tt["instruction"]),
                    target_texts=[] if tt is None else list(tt["target_description"]),
                    caption_image_keys=None if t2i is None else list(t2i["image_sha256"]),
                    reference_keys=None if tt is None else list(tt["source_sha256"]),
                )
            if faults.get("nan_at_step") == step:
                loss = loss * float("nan")
            mean_loss, finite = finite_mean(loss.detach(), world, device)
            if not finite:
                if rank == 0:
                    write_stop(tc.storage, f.run_name, step, float(loss), s3)
                return
            loss.backward()
            _all_reduce_grads(params, world)
            grad_norm = apply_step(opt, sched, params, optim.grad_clip)
            state["step"] = step + 1
            now = time.perf_counter()
            row = {"step": step + 1, "epoch": step // per_epoch, "loss": mean_loss, **parts,
                   "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                   "samples_per_s": f.batch_size * len(config["tasks"]) / max(now - tick, 1e-9)}
            tick, last_loss = now, mean_loss
            if (step + 1) % tc.log_every == 0 or step + 1 == total:
                state["metrics"].append(row)
                if rank == 0:
                    detail = " ".join(f"{k[5:]} {v:.4f}" for k, v in parts.items())
                    print(f"[finetune_embedder] step {step + 1}/{total} loss {mean_loss:.4f} ({detail}) "
                          f"lr {row['lr']:.2e} grad norm {grad_norm:.3g}", flush=True)
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == total:
                if rank == 0:
                    _save_checkpoint(params, names, opt, sched, state, row)
                else:
                    ray.train.report(row)
        if state["step"] == start_step:
            raise TrainingError(f"worker {rank} read no batch of {per_worker} rows of each task: "
                                f"the inputs are smaller than they were when the run started")
    if rank == 0:
        if last_loss is None:
            print(f"[finetune_embedder] the run had already finished ({total} steps): exporting it",
                  flush=True)
        _export(cfg, embedder, state)


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
    cfg = ctx.cfg
    f, tc = cfg.finetune_embedder, cfg.train
    faults = faults if faults is not None else json.loads(os.environ.get(FAULTS_ENV) or "{}")
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
    per_epoch = min(counts.values()) // f.batch_size
    total = per_epoch * f.epochs
    if f.max_steps > 0:
        total = min(total, f.max_steps)
    _, before = resumable_state(tc.storage, f.run_name, "finetune_embedder", "finetune_embedder.run_name",
                                lake.s3)
    summary.read = sum(counts.values())
    summary.extra.update({f"{t}_rows": n for t, n in counts.items()})
    if ctx.dry_run:
        summary.extra.update(steps_per_epoch=per_epoch, resume_from=before.get("step", 0), total=total)
        summary.note = "dry run: no worker started, nothing was written"
        return summary
    print(f"[finetune_embedder] {', '.join(f'{n} {t} rows' for t, n in counts.items())}, {per_epoch} steps "
          f"an epoch, {total} steps, {tc.num_workers} worker(s); run {tc.storage}/{f.run_name}", flush=True)
    loop_config = {"cfg": ctx.conf, "total_steps": total, "steps_per_epoch": per_epoch,
                   "tasks": list(datasets), "faults": faults}
    checkpoint = fit(train_loop, loop_config, tc, f.run_name, datasets, lake.s3, "finetune_embedder",
                     verbose=cfg.log.verbose)
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, "train_state.json")) as fh:
            state = json.load(fh)
    write_metrics(f.output, state["metrics"], "finetune_embedder: contrastive loss", lake.s3)
    resumed = before.get("step", 0)
    restarts = len(state.get("resumes", [])) - len(before.get("resumes", [])) - (1 if before else 0)
    summary.written = state["step"] - resumed
    summary.extra.update(resumed_from=resumed, step=state["step"], total=total, restarts=max(0, restarts),
                         loss=state["metrics"][-1]["loss"] if state["metrics"] else float("nan"))
    used = cfg.models.embedder.name_or_path == f.output
    summary.note = f"embedder: {f.output} " + (
        "(models.embedder loads it: embed re-embeds)" if used
        else "(point models.embedder.name_or_path there to embed with it)")
    return summary
