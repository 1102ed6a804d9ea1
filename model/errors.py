"""The one base of everything the pipeline refuses.

A `PipelineError` is a refusal the user can act on (bad input, a bad config, a
checkpoint of another size, an empty table): the command line prints its message as
one line and exits 2, also when it was raised inside a Ray actor or task. Anything
else is a bug and keeps its traceback. It lives in `model/`, the lowest layer, so that
`model/`, `ops/` and `pipelines/` can all raise it.
"""
from __future__ import annotations


class PipelineError(ValueError):
    """Refused input, config, checkpoint or table; the message says what and how to fix it."""


def find_pipeline_error(exc: BaseException | None) -> PipelineError | None:
    """The PipelineError inside `exc`: itself, or one it wraps (Ray wraps an error raised
    in an actor or task, Ray Data wraps it once more as a UserCodeException)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PipelineError):
            return exc
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None
