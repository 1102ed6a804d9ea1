"""Wiring shared by the stages: Ray start-up, the tiny models, staging, the summary line."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import ray

from pipelines.config import plain  # noqa: F401  (re-exported: the stages import it from here)
from pipelines.lake import Lake

log = logging.getLogger("pipelines")


def init_ray(cfg) -> None:
    if ray.is_initialized():
        return
    ctx_env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false"}
    kwargs = dict(runtime_env={"env_vars": ctx_env}, log_to_driver=True, include_dashboard=False)
    if cfg.ray.address:
        # A cluster (or a `ray job submit` job) brings its own runtime env: passing one
        # here would replace the job's working_dir.
        kwargs.pop("runtime_env")
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(cfg.ray.progress_bars)
    ctx.verbose_stats_logs = False


def prepare_models(cfg) -> None:
    """Builds the tiny random models at the configured paths, if asked and missing."""
    if not cfg.models.build_tiny:
        return
    from model.tiny import build_tiny_mllm, build_tiny_t5_encoder
    from pipelines.synthetic import tokenizer_corpus

    corpus = tokenizer_corpus() + [cfg.caption.prompt_long, cfg.caption.prompt_short, cfg.models.embedder.instruction]
    paths = {cfg.models.captioner.name_or_path, cfg.models.embedder.name_or_path, cfg.models.describer.name_or_path}
    for path in paths:
        if not os.path.exists(os.path.join(path, "config.json")):
            build_tiny_mllm(path, plain(cfg.tiny_models.mllm), corpus, cfg.seed)
    t5 = cfg.models.text_encoder.name_or_path
    if cfg.models.text_encoder.kind == "t5" and not os.path.exists(os.path.join(t5, "config.json")):
        build_tiny_t5_encoder(t5, plain(cfg.tiny_models.t5), corpus, cfg.seed)


@dataclass
class StageSummary:
    """The one line each stage ends with."""

    stage: str
    read: int = 0
    written: int = 0
    skipped: int = 0
    rejected: int = 0
    extra: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        more = "".join(f", {k} {v}" for k, v in self.extra.items())
        return (f"[{self.stage}] read {self.read}, written {self.written}, skipped as unchanged {self.skipped}, "
                f"rejected {self.rejected}{more} in {time.monotonic() - self.started:.1f}s")


def begin_model_stage(cfg, stage: str, source: str | None = "images", source_filter: str | None = None,
                      needs: str = "ingest") -> tuple[Lake, StageSummary] | None:
    """Start-up of a stage that runs a model over the table `source`; None when that
    table is empty (the stage before, `needs`, has not run). source None: the stage
    reads a file and counts it itself."""
    init_ray(cfg)
    prepare_models(cfg)
    lake = Lake.from_conf(cfg)
    summary = StageSummary(stage)
    if source is None:
        return lake, summary
    summary.read = lake.count(source, source_filter)
    if summary.read == 0:
        print(f"[{stage}] the {source} table is empty or missing: run {needs} first")
        return None
    return lake, summary


def write_staging(ds, lake: Lake, stage: str, schema) -> None:
    """Streams a dataset into the stage's (emptied) staging Lance dataset: distributed writes."""
    import lance_ray

    lake.clear_staging(stage)
    lance_ray.write_lance(ds, lake.staging_uri(stage), schema=schema, mode="create",
                          storage_options=lake.storage_options)


def stage_and_commit(ds, lake: Lake, stage: str, staged_schema, table: str, keys, schema,
                     reject_key: str = "image_id") -> dict[str, int]:
    """Writes a stage's output to its staging dataset, then commits it to `table` and
    `rejects` (pipelines.lake.commit) and empties the staging."""
    from pipelines.lake import commit

    write_staging(ds, lake, stage, staged_schema)
    counts = commit(lake, stage, table, keys, schema, reject_key=reject_key)
    lake.clear_staging(stage)
    return counts
