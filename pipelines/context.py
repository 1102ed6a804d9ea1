"""What every command builds once and every stage receives: the run context and the summary.

`RunContext` holds the checked config, the lake and the run id (plus what the stages
of one run tell each other: their summary lines for the results page). `Summary` is
the one result type of every stage: the counts of the one line it prints, what
`nightly` records in its state, and what tests assert on.
"""
from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property

from omegaconf import DictConfig, OmegaConf

from model.errors import PipelineError
from pipelines.config import plain
from pipelines.lake import Lake
from pipelines.quiet import QUIET_ENV, quiet_logs


class ResourceError(PipelineError):
    pass


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


@dataclass
class Summary:
    """read / written / skipped as unchanged / rejected, plus named extras (shown in
    the line in order, readable as attributes: `summary.computed`), a note (where the
    output went), output paths, and the seconds the stage took."""

    stage: str
    read: int = 0
    written: int = 0
    skipped: int = 0
    rejected: int = 0
    extra: dict = field(default_factory=dict)
    note: str = ""
    outputs: dict = field(default_factory=dict)
    seconds: float | None = None
    started: float = field(default_factory=time.monotonic, repr=False)

    def done(self) -> "Summary":
        if self.seconds is None:
            self.seconds = round(time.monotonic() - self.started, 1)
        return self

    def line(self) -> str:
        secs = self.seconds if self.seconds is not None else time.monotonic() - self.started
        more = "".join(f", {k.replace('_', ' ')} {_show(v)}" for k, v in self.extra.items())
        return (
            f"[{self.stage}] read {self.read}, written {self.written}, skipped as unchanged {self.skipped}, "
            f"rejected {self.rejected}{more} in {secs:.1f}s" + (f"; {self.note}" if self.note else "")
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("started")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        return cls(**d)

    def __getattr__(self, name: str):
        extra = self.__dict__.get("extra")
        if name.startswith("_") or extra is None or name not in extra:
            raise AttributeError(name)
        return extra[name]


def _show(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


@dataclass
class RunContext:
    cfg: DictConfig
    lake: Lake
    run_id: str
    # Summary lines of the stages run so far in this command (the results page shows them).
    lines: list[str] = field(default_factory=list)
    # HTML put at the top of the results page (the benchmark's table), and the runs the
    # page shows side by side (mode -> run id; empty: this run alone).
    page_header: str = ""
    page_runs: dict = field(default_factory=dict)
    # Say what would be processed (counts of new, changed, unchanged, rejected rows)
    # without running a model or writing anything.
    dry_run: bool = False

    @classmethod
    def create(cls, cfg: DictConfig, run_id: str | None = None, dry_run: bool = False) -> "RunContext":
        return cls(cfg, Lake.from_conf(cfg), run_id or cfg.rank.run_id or new_run_id(), dry_run=dry_run)

    @cached_property
    def conf(self) -> dict:
        """The whole config as plain dicts: what ops and Ray workers take (they know no OmegaConf)."""
        return plain(self.cfg)

    def with_settings(self, run_id: str | None = None, **dotted) -> "RunContext":
        """The same run with some keys changed (`rank.mode="joint"`): the benchmark's modes."""
        c = OmegaConf.create(OmegaConf.to_container(self.cfg))
        for k, v in dotted.items():
            OmegaConf.update(c, k.replace("__", "."), v)
        OmegaConf.set_readonly(c, True)
        return RunContext(c, Lake.from_conf(c), run_id or self.run_id, self.lines, self.page_header,
                          self.page_runs, self.dry_run)

    def start_ray(self) -> None:
        init_ray(self.cfg)

    def require(self, what: str, cpus: float, gpus: float, key: str) -> None:
        """Refuses, within seconds, a stage that asks for more than the Ray cluster has
        (Ray would wait for it forever): names what was asked, by which key, and what
        is there. Autoscaling clusters (ray.autoscaling) add nodes on demand: no check."""
        import ray

        if self.cfg.ray.autoscaling:
            return
        have = ray.cluster_resources()
        short = [
            (n, need, have.get(n, 0.0))
            for n, need in (("CPU", cpus), ("GPU", gpus))
            if need > have.get(n, 0.0)
        ]
        if short:
            asked = ", ".join(f"{need:g} {n}" for n, need, _ in short)
            there = ", ".join(f"{got:g} {n}" for n, _, got in short)
            raise ResourceError(
                f"{what} asks for {asked} ({key}) but the Ray cluster has {there}: "
                f"lower the request or run on a cluster that has them"
            )


def init_ray(cfg) -> None:
    """Starts Ray, or joins the one this process already started (a test's, a notebook's),
    and applies the run's Ray Data settings either way: they belong to the run."""
    import ray

    if not ray.is_initialized():
        start_ray_session(cfg)
    configure_ray_data(cfg)


def start_ray_session(cfg) -> None:
    import logging

    import ray

    # Ray Train's workers print every line twice without RAY_TRAIN_ENABLE_PRINT_PATCH=0:
    # its patched print goes to Train's logger and, since a Ray worker's stdout is not
    # sys.__stdout__, also to the stream (ray/train/v2/_internal/logging/patch_print.py).
    ctx_env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false",
               "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **({} if cfg.log.verbose else QUIET_ENV)}
    # Quiet: the workers' own lines (Ray Train's controller, Ray Data's split coordinators,
    # Ray's C++ core) stay in the session logs; the driver prints the stages' progress bars
    # and lines, and a worker's error still reaches the command as its exception.
    kwargs = dict(runtime_env={"env_vars": ctx_env}, log_to_driver=bool(cfg.log.verbose),
                  include_dashboard=False,
                  logging_level=logging.INFO if cfg.log.verbose else logging.ERROR)
    if cfg.ray.address:
        # A cluster (or a `ray job submit` job) brings its own runtime env: passing one
        # here would replace the job's working_dir.
        kwargs.pop("runtime_env")
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)


def configure_ray_data(cfg) -> None:
    import ray

    quiet_logs(cfg.log.verbose)
    data = ray.data.DataContext.get_current()
    data.enable_progress_bars = bool(cfg.ray.progress_bars)
    data.verbose_stats_logs = False
    # The "Execution plan" and "Starting execution" lines of every dataset.
    data.print_on_execution_start = bool(cfg.log.verbose)
    # An op's refusal (a PipelineError) must reach the command line: Ray Data wraps a
    # task's error in a UserCodeException that keeps it only in `__cause__`, which Ray
    # does not carry from the worker to the driver.
    data.raise_original_map_exception = True
    data.read_op_min_num_blocks = cfg.ray.read_min_blocks
    # null is Ray's default, also after a run in this process that set another.
    data.shuffle_strategy = cfg.ray.shuffle_strategy or type(data)().shuffle_strategy
