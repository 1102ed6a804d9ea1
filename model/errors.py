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

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    # Ray Data appends its retry advice to a failed task's error ("Failed to apply UDF
    # transform after 1/1 attempts ...", into `args`) before Ray pickles it for the
    # driver; a refusal's message is the one its raiser wrote, there and here.
    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.message,), self.__dict__


def find_pipeline_error(exc: BaseException | None) -> PipelineError | None:
    """The PipelineError inside `exc`: itself, or one it wraps. Ray wraps an error raised
    in a task as a RayTaskError (the original in `.cause`; Ray Data raises it unwrapped,
    pipelines/context.py init_ray) that is also an instance of the original's class but
    prints Ray's traceback, so the original is the one returned; an error raised while
    an actor starts comes as an ActorDiedError (the RayTaskError in its `args`)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PipelineError) and not isinstance(getattr(e, "cause", None), PipelineError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return None
