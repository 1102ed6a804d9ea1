"""What the Ray Train stages share (`train_stage1`, `train_stage2`, `finetune_embedder`):
finding a run's newest checkpoint, the rows in key order and their ordered ingest, the
all-reduced finite-loss check, the fault drills' switch, and the export of a run's
metrics beside its model."""
from __future__ import annotations

import json
import math
import os

import ray
import ray.train
import ray.train.torch
import torch

from model.errors import PipelineError
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
