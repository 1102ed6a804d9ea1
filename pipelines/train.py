"""Stages `train_stage1` and `train_stage2`: Ray Train runs of the two training stages.

Stage 1 trains the prior on (z_0 = f_M(I, T), c = E_text(T)) pairs from `embeddings`
(kind pair) or, with precomputed conditions, `stage1_examples`. Stage 2 freezes a
Stage 1 prior and trains the Control-Adapter on `triplet_embeddings` (z_0 = z_t, with
z_{r,Delta} and the condition text). Both are one `TorchTrainer` over Ray Data shards:
DDP across workers, bf16 autocast on GPU, the optimiser and schedule of
model/training.py, checkpoints every `train.checkpoint_every` steps.

Resume: a run is Ray Train's (storage, name); rerunning the same name, or Ray Train
restarting failed workers (`train.max_failures`), starts from the newest checkpoint,
whose step count continues. A non-finite loss stops every worker at the same step (a
flag all-reduced with the loss) before any weight is touched; the last good checkpoint
stays and the driver raises TrainingError.

Everything that can be checked before a worker starts is: an empty table, a batch
larger than the table, a Stage 1 checkpoint of another size, a run folder whose
checkpoints were made with another model size.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from omegaconf import OmegaConf

from model.checkpoints import CheckpointMismatch, load_prior, prior_config_with_defaults
from model.diffusion import DiffusionConfig, ddpm_scheduler, diffusion_loss
from model.prior import ControlAdapter, FusionDiffPrior, compile_blocks, compile_mode
from model.text_encoder import load_text_encoder_from_conf, text_encoder_dim, text_encoder_name
from model.training import (
    EMA,
    OptimConfig,
    accumulate_gradients,
    apply_step,
    load_training_state,
    make_optimizer,
    make_scheduler,
    save_training_state,
)
from ops.conditions import conditions_from_columns
from ops.storage import copy_dir, local_copy, read_json
from pipelines.common import read_table
from pipelines.config import plain
from pipelines.context import RunContext, Summary
from pipelines.lake import check_vector_dim
from pipelines.ray_train import (
    FAULTS_ENV,
    TrainingError,
    finite_mean,
    fit,
    maybe_inject_failure,
    resumable_state,
    training_rows,
    training_seed,
    write_metrics,
    write_stop,
)

MODEL_DIR, EMA_MODEL_DIR = "model", "ema_model"
# What tells a training table's rows apart (the order training_rows puts them in).
TABLE_KEYS = {"embeddings": "image_id", "stage1_examples": "image_id", "triplet_embeddings": "triplet_id"}



def _source(cfg, stage: str) -> tuple[str, str | None, list[str], str]:
    """(table, filter, columns, what to run first) of a stage's training rows."""
    precomputed = cfg.train.text_conditions == "precomputed"
    encoder = text_encoder_name(plain(cfg.models.text_encoder), plain(cfg.models.embedder)).replace("'", "''")
    if stage == "stage1":
        if precomputed:
            return (
                "stage1_examples",
                f"text_encoder = '{encoder}'",
                ["vector", "cond_tokens", "cond_len"],
                "`conditions` (train.text_conditions is precomputed)",
            )
        return "embeddings", "kind = 'pair'", ["vector", "text"], "`embed`"
    cols = ["z_query", "z_target", "cond_text"]
    if precomputed:
        return (
            "triplet_embeddings",
            f"text_encoder = '{encoder}'",
            cols + ["cond_tokens", "cond_len"],
            "`triplets` (train.text_conditions is precomputed)",
        )
    return "triplet_embeddings", None, cols, "`triplets`"


def _prior_config(cfg) -> dict:
    cond_dim = text_encoder_dim(plain(cfg.models.text_encoder), plain(cfg.models.embedder))
    return {"d_vl": cfg.models.embedder.dim, "cond_dim": cond_dim, **plain(cfg.prior)}


def _expected(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def check_resumable(cfg, stage: str, prior_config: dict, s3: dict) -> dict:
    """The run's newest train_state.json ({} for a new run). A run folder of another
    stage, or whose checkpoints hold a model of another size, is refused: resuming it
    would fail deep inside load_state_dict on every worker."""
    sc = cfg[f"train_{stage}"]
    newest, before = resumable_state(cfg.train.storage, sc.run_name, stage, f"train_{stage}.run_name", s3)
    if newest is None:
        return before
    found = read_json(f"{newest}/{MODEL_DIR}/config.json", s3) or {}
    found = prior_config_with_defaults(found if stage == "stage1" else (found.get("prior_config") or {}))
    diff = {k: (v, found.get(k)) for k, v in _expected(prior_config).items() if found.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: config {a!r}, checkpoint {b!r}" for k, (a, b) in diff.items())
        raise CheckpointMismatch(
            f"run {sc.run_name!r} under {cfg.train.storage} has checkpoints of another model "
            f"({detail}): choose another train_{stage}.run_name or fix the config"
        )
    return before


# ---------------------------------------------------------------- the worker


def _batch_tensors(batch: dict, stage: str, encoder, cond_dim: int, device) -> tuple:
    """(z_0, z_query or None, c, c_mask) of a numpy batch."""

    def vectors(col):
        v = batch[col]
        return torch.from_numpy(np.stack(v) if v.dtype == object else v).float().to(device)

    z0 = vectors("vector" if stage == "stage1" else "z_target")
    zq = vectors("z_query") if stage == "stage2" else None
    if "cond_tokens" in batch:
        c, m = conditions_from_columns(batch["cond_tokens"], batch["cond_len"], cond_dim)
    else:
        c, m = encoder.encode([str(t) for t in batch["text" if stage == "stage1" else "cond_text"]])
        c, m = c.clone(), m.clone()  # the encoder runs in inference mode; autograd needs plain tensors
    return z0, zq, c.to(device), m.to(device)


def _save_checkpoint(model, opt, sched, ema: EMA | None, state: dict, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(os.path.join(d, MODEL_DIR))
        if ema is not None:
            shadow = type(model).from_config(model.config)
            ema.copy_to(shadow)
            shadow.save_pretrained(os.path.join(d, EMA_MODEL_DIR))
        save_training_state(d, opt, sched, ema, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop(config: dict) -> None:
    cfg = OmegaConf.create(config["cfg"])
    stage, total, per_epoch = config["stage"], config["total_steps"], config["steps_per_epoch"]
    faults = config["faults"]
    sc, tc = cfg[f"train_{stage}"], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    prior_config = config["prior_config"]
    seed = training_seed(cfg)
    if stage == "stage1":
        torch.manual_seed(seed)  # the same initial weights in every run of this config
        prior = model = FusionDiffPrior(**prior_config)
    else:
        with tempfile.TemporaryDirectory() as cache:
            prior = load_prior(
                local_copy(sc.prior, plain(cfg.storage.s3), cache), expected=_expected(prior_config)
            )
        prior.requires_grad_(False).eval()
        model = ControlAdapter.from_prior(prior)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(type(model).from_pretrained(os.path.join(d, MODEL_DIR)).state_dict())
    prior.to(device)
    model.to(device)
    optim = OptimConfig.from_conf(plain(sc))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim, fused=tc.fused_optimizer)
    sched = make_scheduler(opt, optim, total)
    ema = EMA(model, sc.ema_decay) if sc.ema_decay > 0 and rank == 0 else None
    state = {"stage": stage, "step": 0, "metrics": []}
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_training_state(d, opt, sched, ema)
        state.setdefault("resumes", []).append(state["step"])
    # Stage 2: rows whose condition is dropped skip the adapter, so some batches leave
    # its parameters unused; DDP must be told.
    wrapped = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": stage == "stage2"}
    )
    if tc.compile != "none":
        # The frozen prior too: in Stage 2 its forward is most of the step.
        mode = compile_mode(tc.compile, "train.compile")
        compile_blocks(prior, mode)
        if model is not prior:
            compile_blocks(model, mode)
    encoder = None
    if tc.text_conditions == "worker":
        encoder = load_text_encoder_from_conf(
            plain(cfg.models.text_encoder), plain(cfg.models.embedder), device=str(device),
            kept_texts=tc.condition_cache_texts,
        )
    diffusion = DiffusionConfig(**plain(cfg.diffusion))
    noise_sched = ddpm_scheduler(diffusion)
    # Seeded anew at every step from (seed, worker, step), and the data's order from
    # (seed, epoch) with Ray Data keeping the blocks' order: a run resumed from a
    # checkpoint draws what the uninterrupted run drew, so its weights equal that run's.
    gen = torch.Generator(device=device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=tc.use_gpu and tc.autocast_bf16)
    shard = ray.train.get_dataset_shard("train")
    per_worker = sc.batch_size // world
    if rank == 0 and state["step"]:
        print(f"[train_{stage}] resuming at step {state['step']}/{total}", flush=True)
    tick, last_loss = time.perf_counter(), None
    while state["step"] < total:
        start_step, skip = state["step"], state["step"] % per_epoch
        batches = shard.iter_batches(
            batch_size=per_worker,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=tc.shuffle_buffer or None,
            local_shuffle_seed=seed * 1_000_003 + state["step"] // per_epoch,
        )
        for i, batch in enumerate(batches):
            # Every worker consumes its whole shard each epoch (Ray Data's split expects
            # it); batches done before a resume, or past the epoch's steps, are skipped.
            if i < skip or i >= per_epoch or state["step"] >= total:
                continue
            step = state["step"]
            gen.manual_seed(seed * 7919 + rank * 104729 + step)
            maybe_inject_failure(cfg.run_dir, faults, f"{stage}_{sc.run_name}", step, rank, world)
            z0, zq, c, m = _batch_tensors(batch, stage, encoder, prior_config["cond_dim"], device)

            def loss_of_rows(rows: slice) -> torch.Tensor:
                take = lambda t: None if t is None else t[rows]
                with torch.autocast(**autocast):
                    if stage == "stage1":
                        return diffusion_loss(
                            wrapped,
                            diffusion,
                            z0[rows],
                            take(c),
                            take(m),
                            generator=gen,
                            scheduler=noise_sched,
                        )
                    return diffusion_loss(
                        prior,
                        diffusion,
                        z0[rows],
                        take(c),
                        take(m),
                        adapter=wrapped,
                        z_query=take(zq),
                        generator=gen,
                        scheduler=noise_sched,
                    )

            loss = accumulate_gradients(
                loss_of_rows, z0.shape[0], tc.micro_batch_size, getattr(wrapped, "no_sync", None)
            )
            if faults.get("nan_at_step") == step:
                loss = loss * float("nan")
            mean_loss, finite = finite_mean(loss.detach(), world, device)
            if not finite:
                if rank == 0:
                    write_stop(tc.storage, sc.run_name, step, float(loss), plain(cfg.storage.s3))
                return
            grad_norm = apply_step(opt, sched, params, optim.grad_clip)
            if ema is not None:
                ema.update(model)
            state["step"] = step + 1
            now = time.perf_counter()
            row = {
                "step": step + 1,
                "epoch": step // per_epoch,
                "loss": mean_loss,
                "lr": sched.get_last_lr()[0],
                "grad_norm": grad_norm,
                "samples_per_s": sc.batch_size / max(now - tick, 1e-9),
            }
            tick, last_loss = now, mean_loss
            if (step + 1) % tc.log_every == 0 or step + 1 == total:
                state["metrics"].append(row)
                if rank == 0:
                    print(
                        f"[train_{stage}] step {step + 1}/{total} loss {mean_loss:.4f} lr {row['lr']:.2e} "
                        f"grad norm {grad_norm:.3g} {row['samples_per_s']:.0f} samples/s",
                        flush=True,
                    )
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == total:
                if rank == 0:
                    _save_checkpoint(model, opt, sched, ema, state, row)
                else:
                    ray.train.report(row)
        if state["step"] == start_step:
            raise TrainingError(
                f"worker {rank} read no batch of {per_worker} rows from its shard: "
                f"the table is smaller than it was when the run started"
            )
    if rank == 0 and last_loss is None:
        print(f"[train_{stage}] the run had already finished ({total} steps): nothing to train", flush=True)


# ---------------------------------------------------------------- the driver


def run_stage1(ctx: RunContext) -> Summary:
    return run(ctx, "stage1")


def run_stage2(ctx: RunContext) -> Summary:
    return run(ctx, "stage2")


def run(ctx: RunContext, stage: str, faults: dict | None = None) -> Summary:
    """Trains `stage` (stage1 or stage2) on Ray Train; `faults` (or the FAULTS_ENV
    variable) injects the drills' failures."""
    cfg = ctx.cfg
    sc, tc = cfg[f"train_{stage}"], cfg.train
    faults = faults if faults is not None else json.loads(os.environ.get(FAULTS_ENV) or "{}")
    summary = Summary(f"train_{stage}")
    ctx.start_ray()
    lake = ctx.lake
    ctx.require(
        f"train_{stage} ({tc.num_workers} workers)",
        tc.num_workers * tc.cpus_per_worker,
        tc.num_workers if tc.use_gpu else 0,
        "train.num_workers, train.cpus_per_worker, train.use_gpu",
    )
    table, flt, columns, needs = _source(cfg, stage)
    rows = lake.count(table, flt)
    if rows == 0:
        raise TrainingError(
            f"no training rows in {lake.uri(table)}"
            + (f" where {flt}" if flt else "")
            + f": run {needs} first"
        )
    check_vector_dim(
        lake.open(table),
        cfg.models.embedder.dim,
        lake.uri(table),
        "vector" if stage == "stage1" else "z_target",
    )
    per_epoch = rows // sc.batch_size
    if per_epoch == 0:
        raise TrainingError(
            f"{lake.uri(table)} has {rows} training rows, fewer than one batch "
            f"(train_{stage}.batch_size={sc.batch_size})"
        )
    total = per_epoch * sc.epochs
    if sc.max_steps > 0:
        total = min(total, sc.max_steps)
    prior_config = _prior_config(cfg)
    if stage == "stage2":
        with tempfile.TemporaryDirectory() as cache:
            # Refused here, before any worker starts, when the sizes differ from the config.
            load_prior(local_copy(sc.prior, lake.s3, cache), expected=_expected(prior_config))
    before = check_resumable(cfg, stage, prior_config, lake.s3)
    if ctx.dry_run:
        summary.read = rows
        summary.extra.update(steps_per_epoch=per_epoch, resume_from=before.get("step", 0), total=total)
        summary.note = "dry run: no worker started, nothing was written"
        return summary

    print(
        f"[train_{stage}] {rows} rows, {per_epoch} steps an epoch, {total} steps, "
        f"{tc.num_workers} worker(s); run {tc.storage}/{sc.run_name}",
        flush=True,
    )
    loop_config = {
        "cfg": ctx.conf,
        "stage": stage,
        "total_steps": total,
        "steps_per_epoch": per_epoch,
        "prior_config": prior_config,
        "faults": faults,
    }
    key = TABLE_KEYS[table]
    train_rows = training_rows(read_table(lake, table, [key, *columns], filter=flt), rows, key,
                               tc.materialize_max_rows, tc.key_order_rows_per_block)
    checkpoint = fit(train_loop, loop_config, tc, sc.run_name, {"train": train_rows}, lake.s3,
                     f"train_{stage}", verbose=cfg.log.verbose)
    state = export(cfg, stage, checkpoint, lake.s3)
    resumed = before.get("step", 0)
    restarts = len(state.get("resumes", [])) - len(before.get("resumes", [])) - (1 if before else 0)
    summary.read, summary.written = rows, state["step"] - resumed
    summary.extra.update(
        resumed_from=resumed,
        step=state["step"],
        total=total,
        restarts=max(0, restarts),
        loss=state["metrics"][-1]["loss"] if state["metrics"] else float("nan"),
    )
    summary.note = f"model: {sc.output}"
    return summary


def export(cfg, stage: str, checkpoint: ray.train.Checkpoint, s3: dict) -> dict:
    """The trained model (EMA weights when kept) to train_<stage>.output, with the run's
    metrics as JSON lines and its loss curve as a PNG; returns the checkpoint's state."""
    out = cfg[f"train_{stage}"].output.rstrip("/")
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, "train_state.json")) as f:
            state = json.load(f)
        src = os.path.join(d, EMA_MODEL_DIR if os.path.isdir(os.path.join(d, EMA_MODEL_DIR)) else MODEL_DIR)
        copy_dir(src, out, s3)
    write_metrics(out, state["metrics"], f"train_{stage}: diffusion loss", s3)
    return state
