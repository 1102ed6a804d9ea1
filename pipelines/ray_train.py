"""What the Ray Train stages share (`train_stage1`, `train_stage2`, `finetune_embedder`):
the one training loop (`run_worker`) and what it asks of a stage (`Trainable`), finding a
run's newest checkpoint, the rows in key order and their ordered ingest, the all-reduced
finite-loss check, the fault drills (`Faults`), the step plan and the summary of a run,
and the export of a run's metrics beside its model."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import ray
import ray.train
import ray.train.torch
import torch

from model.errors import PipelineError
from model.training import OptimConfig, apply_step, load_training_state, make_optimizer, make_scheduler
from model.training import save_training_state
from ops.plots import line_chart_png
from ops.storage import filesystem, read_json, write_bytes

# Fault drills (tests and crash drills only, never a config key): a JSON object in this
# environment variable, e.g. {"fail_at_step": 7} (the last worker raises once at that
# step) or {"nan_at_step": 7} (the loss is made NaN there).
FAULTS_ENV = "CIRPIPE_TEST_FAULTS"
# How often Ray Train's controller polls its workers (conf train.health_check_interval_s).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_SET_BY_USER = HEALTH_CHECK_ENV in os.environ


class TrainingError(PipelineError):
    pass


def newest_checkpoint(storage: str, run_name: str, s3: dict) -> str | None:
    """The newest checkpoint folder of a run (Ray Train names them checkpoint_<time>)."""
    from pyarrow.fs import FileSelector

    fs, path = filesystem(f"{storage.rstrip('/')}/{run_name}", s3)
    try:
        infos = fs.get_file_info(FileSelector(path, allow_not_found=True))
    except OSError:
        return None
    names = sorted(
        i.base_name for i in infos if i.type.name == "Directory" and i.base_name.startswith("checkpoint_")
    )
    return f"{storage.rstrip('/')}/{run_name}/{names[-1]}" if names else None


def resumable_state(storage: str, run_name: str, stage: str, key: str, s3: dict) -> tuple[str | None, dict]:
    """A run's newest checkpoint and its train_state.json (None and {} for a new run).
    A run folder holding another stage's checkpoints is refused, naming that stage and
    `key`, the setting to change: its weights are another model's."""
    newest = newest_checkpoint(storage, run_name, s3)
    state = (read_json(f"{newest}/train_state.json", s3) or {}) if newest else {}
    if state.get("stage", stage) != stage:
        raise TrainingError(f"run {run_name!r} under {storage} holds checkpoints of {state['stage']}, "
                            f"not of {stage}: choose another {key}")
    return newest, state


def ordered_ingest():
    """Ray Train's ingest options with the blocks kept in order, so that an epoch's rows
    arrive in the same order in every run (resuming to the same weights needs it)."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def in_key_order(ds: ray.data.Dataset, key: str | list[str], rows_per_block: int) -> ray.data.Dataset:
    """The dataset read once, sorted by `key` and kept in Ray's object store: every epoch
    then reads it from there, in an order that does not depend on the order in which the
    stage that wrote the rows committed them (a run from scratch trains on the batches
    the last one did). `key` must tell rows apart, or be every column."""
    # The sort's blocks end where sampled boundaries fall, and how many there are follows
    # the table's files (pull-based sorting keeps the input's count), while the local
    # shuffle's draws depend on the blocks' sizes: so the sorted rows are cut again into
    # a number of blocks that follows only the row count. A split repartition keeps the
    # rows' order and cuts even blocks; a strict streaming one (target_num_rows_per_block)
    # was seen to reorder blocks on Ray 2.x.
    ordered = ds.sort(key).materialize()
    blocks = max(1, math.ceil(ordered.count() / rows_per_block))
    return ordered.repartition(num_blocks=blocks).materialize()


def training_rows(ds: ray.data.Dataset, rows: int, key: str, max_rows: int,
                  rows_per_block: int) -> ray.data.Dataset:
    """What a training stage reads every epoch (conf train.materialize_max_rows): a table of
    at most `max_rows` rows in_key_order (a read of the table costs about a second an
    epoch however small it is: the demo's 50 epochs of 7 steps), a larger one streamed
    from storage every epoch in its stored order."""
    return in_key_order(ds, key, rows_per_block) if rows <= max_rows else ds


def training_seed(cfg) -> int:
    """The seed of a training stage's draws (conf train.seed; null: the run's seed)."""
    return cfg.seed if cfg.train.seed is None else cfg.train.seed


def finite_mean(loss: torch.Tensor, world: int, device) -> tuple[float, bool]:
    """The loss averaged over workers, and whether every worker's loss was finite:
    one all-reduce, so that all workers stop at the same step."""
    finite = bool(torch.isfinite(loss))
    if world == 1:
        return float(loss), finite
    t = torch.tensor([float(loss) if finite else 0.0, 0.0 if finite else 1.0], device=device)
    torch.distributed.all_reduce(t)
    return float(t[0]) / world, float(t[1]) == 0.0


def write_metrics(out: str, rows: list[dict], title: str, s3: dict) -> None:
    """A run's metrics rows as `<out>/metrics.jsonl` and its loss curve as `<out>/loss.png`."""
    write_bytes(f"{out}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode(), s3)
    write_bytes(
        f"{out}/loss.png",
        line_chart_png([r["step"] for r in rows], [r["loss"] for r in rows], title, "step", "loss"),
        s3,
    )


def maybe_inject_failure(run_dir: str, faults: dict, run: str, step: int, rank: int, world: int) -> None:
    """The drills' fail_at_step: the last worker raises once (a marker under run_dir says it did)."""
    if faults.get("fail_at_step") != step or rank != world - 1:
        return
    marker = os.path.join(run_dir, f".injected_failure_{run}")
    if os.path.exists(marker):
        return
    os.makedirs(run_dir, exist_ok=True)
    open(marker, "w").close()
    raise RuntimeError(f"injected failure at step {step} on worker {rank} ({FAULTS_ENV} fail_at_step)")


def stop_marker(storage: str, run_name: str) -> str:
    """Written by a run that stopped itself (a non-finite loss); read by the driver."""
    return f"{storage.rstrip('/')}/{run_name}/stopped.json"


def write_stop(storage: str, run_name: str, step: int, loss: float, s3: dict) -> None:
    write_bytes(stop_marker(storage, run_name),
                json.dumps({"step": step, "loss": loss, "reason": "non-finite loss"}).encode(), s3)


def clear_stop(storage: str, run_name: str, s3: dict) -> None:
    """A rerun tries again from the last good checkpoint."""
    fs, marker = filesystem(stop_marker(storage, run_name), s3)
    if fs.get_file_info(marker).type.name != "NotFound":
        fs.delete_file(marker)


def raise_if_stopped(storage: str, run_name: str, s3: dict, label: str) -> None:
    stopped = read_json(stop_marker(storage, run_name), s3)
    if stopped:
        kept = newest_checkpoint(storage, run_name, s3) or "none (no checkpoint was made yet)"
        raise TrainingError(
            f"{label} stopped at step {stopped['step']}: the loss was {stopped['loss']} "
            f"({stopped['reason']}); nothing was exported, the last good checkpoint is kept: {kept}"
        )


def fit(loop, loop_config: dict, train_conf, run_name: str, datasets: dict, s3: dict, label: str,
        verbose: bool = False):
    """Runs `loop` on a TorchTrainer of `train_conf` (conf `train`: workers, GPUs, storage,
    failures, checkpoints kept) as Ray Train run `run_name`, its datasets read in order;
    returns the newest checkpoint; `verbose` (conf log.verbose) shows Ray Train's own INFO
    lines (worker-group start-up, resource requests). A run that failed past its restarts, stopped itself
    (a non-finite loss) or made no checkpoint raises TrainingError naming it."""
    tc = train_conf
    clear_stop(tc.storage, run_name, s3)
    if not HEALTH_CHECK_SET_BY_USER:
        # Ray Train passes this variable from the driver to its controller and workers.
        os.environ[HEALTH_CHECK_ENV] = str(tc.health_check_interval_s)
    fs, path = filesystem(tc.storage, s3)
    trainer = ray.train.torch.TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ordered_ingest()),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"{label} failed after {tc.max_failures} restarts: {e}") from None
    raise_if_stopped(tc.storage, run_name, s3, label)
    if result.checkpoint is None:
        raise TrainingError(f"{label} finished without a checkpoint under {tc.storage}/{run_name}")
    return result.checkpoint


# ---------------------------------------------------------------- the one training loop


class Faults:
    """The fault drills of a run (tests and drills only, never config): `fail_at_step`
    makes the last worker raise once at that step, `nan_at_step` makes the loss NaN there.
    The loop calls these hooks; a production run's spec is empty and they do nothing."""

    def __init__(self, spec: dict, run_dir: str, run: str):
        self.spec, self.run_dir, self.run = spec, run_dir, run

    def before_step(self, step: int, rank: int, world: int) -> None:
        maybe_inject_failure(self.run_dir, self.spec, self.run, step, rank, world)

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if self.spec.get("nan_at_step") == step else loss


def faults_of(faults: dict | None) -> dict:
    """The drills' spec: given by a test, else the FAULTS_ENV variable's JSON, else none."""
    return faults if faults is not None else json.loads(os.environ.get(FAULTS_ENV) or "{}")


class Trainable:
    """What a training stage supplies to `run_worker`; the loop does the rest (epochs and
    skipping on resume, the non-finite stop, metrics, checkpoints, the resume arithmetic).

    A subclass is built in each worker as `Cls(cfg, config, device, rank, world)` and sets
    `params` (the trained tensors) and `optim` (its OptimConfig) there."""

    stage: str  # what train_state.json's "stage" says (a run folder of another is refused)
    label: str  # how lines and errors name the stage
    run_name: str
    batch_size: int  # the global batch of a step (split over the workers)
    samples_per_step: int  # rows a step trains on, for samples/s
    prefetch = False  # prepare() the next batch in a thread while a step runs
    params: list
    optim: OptimConfig

    def load(self, directory: str) -> None:
        """The trained weights from a checkpoint folder (read once per worker start)."""
        raise NotImplementedError

    def make_ema(self):
        """The EMA of the weights to keep (None: none), made after `load` and updated by
        the stage's `after_step`; the loop saves and restores it with the optimiser."""
        return None

    def ready(self) -> None:
        """After the weights and optimiser state are in place: DDP, compilation, encoders."""

    def epoch_batches(self, shards: dict, per_worker: int, shuffle_seed: int) -> Iterable[Any]:
        """One epoch of this worker's batches, read to the end of its shards; None for a
        position that cannot make a step (one task's shard ran out first)."""
        raise NotImplementedError

    def prepare(self, batch) -> Any:
        """What the step needs of a batch (tensors, decoded images)."""
        return batch

    def step(self, batch, step: int) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one batch, its gradients averaged over the workers:
        (the batch's mean loss, detached; named parts of it for the metrics)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """After the optimiser's step (the EMA's update, where the stage keeps one)."""

    def save(self, directory: str) -> None:
        """The trained weights into a checkpoint folder being written."""
        raise NotImplementedError

    def finish(self, state: dict) -> None:
        """Worker 0, after the last step (or at once, for a finished run)."""


def _usable(batches: Iterable, skip: int, per_epoch: int) -> Iterator:
    """An epoch's batches from the resume point on, up to the epoch's steps; the shard is
    still read to its end (Ray Data's split expects every worker to)."""
    for i, batch in enumerate(batches):
        if skip <= i < per_epoch and batch is not None:
            yield batch


def _prefetched(items: Iterable, prepare, ahead: bool) -> Iterator:
    """prepare(item) of each item; with `ahead`, the next one's in a thread while the
    caller works on the current one (image decoding beside the step)."""
    if not ahead:
        yield from map(prepare, items)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for item in items:
            nxt = pool.submit(prepare, item)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def _save(task: Trainable, opt, sched, ema, state: dict, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        task.save(d)
        save_training_state(d, opt, sched, ema, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_worker(task_class: type[Trainable], config: dict) -> None:
    """The training loop of every Ray Train stage, in each worker. `config`: the whole
    plain config (`cfg`), `total_steps`, `steps_per_epoch`, `shards` (dataset names) and
    `faults`, plus what the stage's Trainable reads."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config["cfg"])
    total, per_epoch, tc = config["total_steps"], config["steps_per_epoch"], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    seed = training_seed(cfg)
    task = task_class(cfg, config, device, rank, world)
    faults = Faults(config["faults"], cfg.run_dir, f"{task.stage}_{task.run_name}")
    opt = make_optimizer(task.params, task.optim, fused=tc.fused_optimizer)
    sched = make_scheduler(opt, task.optim, total)
    state = {"stage": task.stage, "step": 0, "metrics": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        ema = task.make_ema()
    else:
        with checkpoint.as_directory() as d:  # one download a worker start
            task.load(d)
            ema = task.make_ema()
            state = load_training_state(d, opt, sched, ema)
        state.setdefault("resumes", []).append(state["step"])
        if rank == 0:
            print(f"[{task.label}] resuming at step {state['step']}/{total}", flush=True)
    task.ready()
    shards = {name: ray.train.get_dataset_shard(name) for name in config["shards"]}
    per_worker = task.batch_size // world
    tick, trained = time.perf_counter(), False
    while state["step"] < total:
        start_step = state["step"]
        shuffle_seed = seed * 1_000_003 + start_step // per_epoch
        batches = _usable(task.epoch_batches(shards, per_worker, shuffle_seed), start_step % per_epoch,
                          per_epoch)
        for batch in _prefetched(batches, task.prepare, task.prefetch):
            if state["step"] >= total:
                continue
            step = state["step"]
            faults.before_step(step, rank, world)
            loss, parts = task.step(batch, step)
            loss = faults.loss(loss, step)
            mean_loss, finite = finite_mean(loss, world, device)
            if not finite:  # every worker stops here, before the weights are touched
                if rank == 0:
                    write_stop(tc.storage, task.run_name, step, float(loss), dict(cfg.storage.s3))
                return
            grad_norm = apply_step(opt, sched, task.params, task.optim.grad_clip)
            task.after_step()
            state["step"], trained, now = step + 1, True, time.perf_counter()
            row = {"step": step + 1, "epoch": step // per_epoch, "loss": mean_loss, **parts,
                   "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                   "samples_per_s": task.samples_per_step / max(now - tick, 1e-9)}
            tick = now
            if (step + 1) % tc.log_every == 0 or step + 1 == total:
                state["metrics"].append(row)
                if rank == 0:
                    detail = "".join(f" {k.removeprefix('loss_')} {v:.4f}" for k, v in parts.items())
                    print(f"[{task.label}] step {step + 1}/{total} loss {mean_loss:.4f}{detail} "
                          f"lr {row['lr']:.2e} grad norm {grad_norm:.3g} "
                          f"{row['samples_per_s']:.0f} samples/s",
                          flush=True)
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == total:
                if rank == 0:
                    _save(task, opt, sched, ema, state, row)
                else:
                    ray.train.report(row)
        if state["step"] == start_step:
            raise TrainingError(f"worker {rank} read no batch of {per_worker} rows from its shards: "
                                f"the inputs are smaller than they were when the run started")
    if rank == 0:
        if not trained:
            print(f"[{task.label}] the run had already finished ({total} steps): nothing to train",
                  flush=True)
        task.finish(state)


def plan_steps(rows: int, batch_size: int, epochs: int, max_steps: int) -> tuple[int, int]:
    """(steps an epoch, total steps) of a run over `rows` rows (max_steps > 0 caps it)."""
    per_epoch = rows // batch_size
    total = per_epoch * epochs
    return per_epoch, min(total, max_steps) if max_steps > 0 else total


def dry_run_summary(summary, per_epoch: int, before: dict, total: int):
    summary.extra.update(steps_per_epoch=per_epoch, resume_from=before.get("step", 0), total=total)
    summary.note = "dry run: no worker started, nothing was written"
    return summary


def run_summary(summary, before: dict, state: dict, total: int):
    """The counts of a finished run: the steps this command trained (written), where it
    resumed from, and the worker restarts Ray Train made during it."""
    resumed = before.get("step", 0)
    restarts = len(state.get("resumes", [])) - len(before.get("resumes", [])) - (1 if before else 0)
    summary.written = state["step"] - resumed
    summary.extra.update(resumed_from=resumed, step=state["step"], total=total, restarts=max(0, restarts),
                         loss=state["metrics"][-1]["loss"] if state["metrics"] else float("nan"))
    return summary
