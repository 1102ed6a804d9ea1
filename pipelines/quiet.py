"""What the terminal shows (conf log.verbose, the command line's --verbose).

Kept apart from the modules that import Ray, Lance or transformers, so that the command
line applies it before any of them loads and reads its environment.
"""
from __future__ import annotations

import os

# What a quiet run (log.verbose: false) sets in the driver and every Ray worker: the
# libraries' loading bars and advisory lines off; their warnings and errors stay.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DIFFUSERS_VERBOSITY": "error",
             "RAY_DEDUP_LOGS": "1", "LANCE_LOG": "error",
             "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning:lance"}
# Ray's loggers: a quiet run shows their errors only (their INFO lines are execution
# plans, worker-group start-up, banners; their warnings are about Ray's own scheduling,
# such as a dataset waiting for the CPUs a training run holds). Ray's session logs keep
# every line.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air")


def quiet_logs(verbose: bool) -> None:
    """The driver's side of log.verbose: the environment the libraries read when they
    load, and the level of Ray's console handlers (their file handlers keep everything)."""
    import logging
    import warnings

    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if "File" not in type(handler).__name__:  # Ray's session-log handlers keep everything
                handler.setLevel(logging.ERROR)
        if not logger.handlers:
            logger.setLevel(logging.ERROR)


def ray_logs_folder() -> str | None:
    """Where this process's Ray session keeps every process's full logs, if Ray runs."""
    try:
        import ray

        if ray.is_initialized():
            return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 (only ever used to add a hint to an error)
        return None
    return None
