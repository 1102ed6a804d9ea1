"""A refusal keeps the message its raiser wrote on its way from a Ray worker to the
command line (model/errors.py)."""
from __future__ import annotations

import pickle

import pytest

from model.checkpoints import CheckpointMismatch
from model.errors import find_pipeline_error

pytestmark = pytest.mark.fast


def test_a_refusal_pickles_without_the_retry_advice_ray_data_appends_to_its_args():
    err = CheckpointMismatch("checkpoint p does not match the config (cond_dim: expected 64, found 32)")
    # What ray/data/_internal/util.py _annotate_exception_with_retry_context does to it.
    err.args = (f"{err.args[0]}\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s).",)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is CheckpointMismatch
    assert str(back) == "checkpoint p does not match the config (cond_dim: expected 64, found 32)"


def test_the_refusal_found_inside_a_ray_task_error_is_the_original_not_ray_s_dual():
    from ray.exceptions import RayTaskError

    original = CheckpointMismatch("cond_dim: expected 64, found 32")
    # A RayTaskError as the driver gets it: an instance of the original's class too,
    # whose str is Ray's traceback.
    dual = RayTaskError("MapBatches(run_kept_op)", "Traceback (most recent call last): ...", original).as_instanceof_cause()
    assert isinstance(dual, CheckpointMismatch) and str(dual) != str(original)
    try:
        raise RuntimeError("the dataset's execution failed") from dual
    except RuntimeError as outer:
        assert find_pipeline_error(outer) is original
    assert find_pipeline_error(ValueError("a bug, not a refusal")) is None
