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

import functools
import json
import os
import tempfile

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from model.checkpoints import CheckpointMismatch, load_prior, prior_config_with_defaults
from model.diffusion import DiffusionConfig, ddpm_scheduler, diffusion_loss
from model.prior import ControlAdapter, FusionDiffPrior, compile_blocks, compile_mode
from model.text_encoder import load_text_encoder_from_conf, text_encoder_dim, text_encoder_name
from model.training import EMA, OptimConfig, accumulate_gradients
from ops.conditions import conditions_from_columns
from ops.storage import copy_dir, local_copy, read_json
from pipelines.common import read_table
from pipelines.config import plain
from pipelines.context import RunContext, Summary
from pipelines.lake import check_vector_dim
from pipelines.ray_train import (
    Trainable,
    TrainingError,
    dry_run_summary,
    faults_of,
    fit,
    plan_steps,
    resumable_state,
    run_summary,
    run_worker,
    training_rows,
    training_seed,
    write_metrics,
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


class DiffusionStage(Trainable):
    """Stage 1 (the prior) or Stage 2 (the Control-Adapter on a frozen prior) in a worker:
    what the shared loop (pipelines/ray_train.py run_worker) asks of a stage."""

    def __init__(self, cfg, config: dict, device, rank: int, world: int):
        stage = self.stage = config["stage"]
        self.cfg, self.device, self.label = cfg, device, f"train_{stage}"
        sc, tc = cfg[f"train_{stage}"], cfg.train
        self.sc, self.tc, self.run_name = sc, tc, sc.run_name
        self.batch_size = self.samples_per_step = sc.batch_size
        self.prior_config, self.rank = config["prior_config"], rank
        if stage == "stage1":
            torch.manual_seed(training_seed(cfg))  # the same initial weights in every run of this config
            self.prior = self.model = FusionDiffPrior(**self.prior_config)
        else:
            with tempfile.TemporaryDirectory() as cache:
                self.prior = load_prior(
                    local_copy(sc.prior, plain(cfg.storage.s3), cache), expected=_expected(self.prior_config)
                )
            self.prior.requires_grad_(False).eval()
            self.model = ControlAdapter.from_prior(self.prior)
        self.prior.to(device)
        self.model.to(device)
        self.optim = OptimConfig.from_conf(plain(sc))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = None

    def load(self, directory: str) -> None:
        loaded = type(self.model).from_pretrained(os.path.join(directory, MODEL_DIR))
        self.model.load_state_dict(loaded.state_dict())

    def make_ema(self):
        keep = self.sc.ema_decay > 0 and self.rank == 0
        self.ema = EMA(self.model, self.sc.ema_decay) if keep else None
        return self.ema

    def ready(self) -> None:
        cfg, tc, device = self.cfg, self.tc, self.device
        # Stage 2: rows whose condition is dropped skip the adapter, so some batches leave
        # its parameters unused; DDP must be told.
        self.wrapped = ray.train.torch.prepare_model(
            self.model, parallel_strategy_kwargs={"find_unused_parameters": self.stage == "stage2"}
        )
        if tc.compile != "none":
            # The frozen prior too: in Stage 2 its forward is most of the step.
            mode = compile_mode(tc.compile, "train.compile")
            compile_blocks(self.prior, mode)
            if self.model is not self.prior:
                compile_blocks(self.model, mode)
        self.encoder = None
        if tc.text_conditions == "worker":
            self.encoder = load_text_encoder_from_conf(
                plain(cfg.models.text_encoder), plain(cfg.models.embedder), device=str(device),
                kept_texts=tc.condition_cache_texts,
            )
        self.diffusion = DiffusionConfig(**plain(cfg.diffusion))
        self.noise_sched = ddpm_scheduler(self.diffusion)
        # Seeded anew at every step from (seed, worker, step), and the data's order from
        # (seed, epoch) with Ray Data keeping the blocks' order: a run resumed from a
        # checkpoint draws what the uninterrupted run drew, so its weights equal that run's.
        self.gen = torch.Generator(device=device)
        self.seed = training_seed(cfg)
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16,
                             enabled=tc.use_gpu and tc.autocast_bf16)

    def epoch_batches(self, shards: dict, per_worker: int, shuffle_seed: int):
        return shards["train"].iter_batches(
            batch_size=per_worker, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=self.tc.shuffle_buffer or None, local_shuffle_seed=shuffle_seed,
        )

    def step(self, batch, step: int) -> tuple[torch.Tensor, dict]:
        self.gen.manual_seed(self.seed * 7919 + self.rank * 104729 + step)
        z0, zq, c, m = _batch_tensors(batch, self.stage, self.encoder, self.prior_config["cond_dim"],
                                      self.device)

        def loss_of_rows(rows: slice) -> torch.Tensor:
            take = lambda t: None if t is None else t[rows]
            common = dict(generator=self.gen, scheduler=self.noise_sched)
            with torch.autocast(**self.autocast):
                if self.stage == "stage1":
                    return diffusion_loss(self.wrapped, self.diffusion, z0[rows], take(c), take(m), **common)
                return diffusion_loss(self.prior, self.diffusion, z0[rows], take(c), take(m),
                                      adapter=self.wrapped, z_query=take(zq), **common)

        loss = accumulate_gradients(loss_of_rows, z0.shape[0], self.tc.micro_batch_size,
                                    getattr(self.wrapped, "no_sync", None))
        return loss, {}

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def save(self, directory: str) -> None:
        self.model.save_pretrained(os.path.join(directory, MODEL_DIR))
        if self.ema is not None:
            shadow = type(self.model).from_config(self.model.config)
            self.ema.copy_to(shadow)
            shadow.save_pretrained(os.path.join(directory, EMA_MODEL_DIR))


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
    per_epoch, total = plan_steps(rows, sc.batch_size, sc.epochs, sc.max_steps)
    if per_epoch == 0:
        raise TrainingError(
            f"{lake.uri(table)} has {rows} training rows, fewer than one batch "
            f"(train_{stage}.batch_size={sc.batch_size})"
        )
    prior_config = _prior_config(cfg)
    if stage == "stage2":
        with tempfile.TemporaryDirectory() as cache:
            # Refused here, before any worker starts, when the sizes differ from the config.
            load_prior(local_copy(sc.prior, lake.s3, cache), expected=_expected(prior_config))
    before = check_resumable(cfg, stage, prior_config, lake.s3)
    summary.read = rows
    if ctx.dry_run:
        return dry_run_summary(summary, per_epoch, before, total)

    print(
        f"[train_{stage}] {rows} rows, {per_epoch} steps an epoch, {total} steps, "
        f"{tc.num_workers} worker(s); run {tc.storage}/{sc.run_name}",
        flush=True,
    )
    loop_config = {"cfg": ctx.conf, "stage": stage, "total_steps": total, "steps_per_epoch": per_epoch,
                   "prior_config": prior_config, "faults": faults_of(faults), "shards": ["train"]}
    key = TABLE_KEYS[table]
    train_rows = training_rows(read_table(lake, table, [key, *columns], filter=flt), rows, key,
                               tc.materialize_max_rows, tc.key_order_rows_per_block)
    checkpoint = fit(functools.partial(run_worker, DiffusionStage), loop_config, tc, sc.run_name,
                     {"train": train_rows}, lake.s3, f"train_{stage}", verbose=cfg.log.verbose)
    state = export(cfg, stage, checkpoint, lake.s3)
    run_summary(summary, before, state, total)
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
