"""The crash drill: kill -9 the whole process group of each data stage and of rank at a
seeded random point, rerun it, and the tables equal those of an uninterrupted run.

Both runs read one synthetic catalogue (same uris, same bytes). The drill's seed is
CIRPIPE_DRILL_SEED (0 by default): another seed tries other kill points. Each killed
command ran in its own session with its own Ray temp dir, so nothing of it survives
the kill (its Ray processes are found by that dir and killed too). Training is drilled
at the checkpoint level in tests/test_train.py (a resumed run's weights equal an
uninterrupted run's).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import lance
import numpy as np
import pytest

from bench.resume_cost import kill_all
from tests.conftest import tiny_overrides

STAGES = ("ingest", "caption", "embed", "rank")
# Columns that legitimately differ between two runs (wall-clock stamps).
VOLATILE = {"run_at", "run_date"}
KEYS = {"images": ["image_id"], "captions": ["image_id"], "embeddings": ["image_id", "kind"],
        "query_vectors": ["query_id", "mode"], "rankings": ["run_id", "query_id", "rank"],
        "rejects": ["stage", "key"]}


# A command's start-up (imports, Ray) before its stage's work, on the 2-core machines.
STARTUP_S = 10.0


def _overrides(run_dir, catalogue, tiny_models):
    return tiny_overrides(run_dir, tiny_models, f"catalogue.manifest={catalogue}/manifest.parquet",
                          f"catalogue.queries={catalogue}/queries.parquet", "rank.mode=query_only",
                          "rank.run_id=drill", "rank.top_k=5", "ray.num_cpus=2")


def _command(run_dir, catalogue, tiny_models, stage):
    return [sys.executable, "-m", "pipelines", stage, "--config", "conf/demo.yaml",
            *_overrides(run_dir, catalogue, tiny_models)]


def _start(cmd, ray_tmp):
    os.makedirs(ray_tmp, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_TMPDIR=str(ray_tmp))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _run(cmd, ray_tmp) -> float:
    started = time.monotonic()
    proc = _start(cmd, ray_tmp)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    kill_all(proc, ray_tmp)
    return time.monotonic() - started


def _tables(root) -> dict:
    out = {}
    for table, keys in KEYS.items():
        if not os.path.exists(f"{root}/{table}.lance"):
            out[table] = {}
            continue
        t = lance.dataset(f"{root}/{table}.lance").to_table()
        rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in t.to_pylist()]
        ids = [tuple(r[k] for k in keys) for r in rows]
        assert len(ids) == len(set(ids)), f"{table}: duplicate keys"
        out[table] = dict(zip(ids, rows))
    return out


def _same(a: dict, b: dict, table: str) -> None:
    assert a.keys() == b.keys(), f"{table}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for key, row in a.items():
        other = b[key]
        for col, v in row.items():
            w = other[col]
            if isinstance(v, list) or isinstance(v, float):
                np.testing.assert_allclose(np.asarray(w, dtype=float), np.asarray(v, dtype=float), atol=1e-5,
                                           err_msg=f"{table} {key} {col}")
            else:
                assert v == w, f"{table} {key} {col}: {v!r} != {w!r}"


@pytest.fixture
def ray_dirs():
    """Short Ray temp dirs (Ray's socket paths must stay under 108 bytes)."""
    import shutil
    import tempfile

    dirs = {k: tempfile.mkdtemp(prefix=f"drill_{k}_", dir="/tmp") for k in ("drill",)}
    yield dirs
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.drill
def test_kill_at_a_random_point_of_each_stage_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_models,
                                                                                      ray_dirs, ray_local):
    from pipelines.config import load_config
    from pipelines.synthetic import make_catalogue
    from tests.conftest import run_stage

    seed = int(os.environ.get("CIRPIPE_DRILL_SEED", "0"))
    rng = random.Random(seed)
    catalogue = tmp_path / "catalogue"
    make_catalogue(str(catalogue), num_images=12, image_size=64, num_triplets=0, num_queries=4, seed=seed)
    # The uninterrupted run, in this process (the same code and config as the command's).
    reference = load_config("conf/demo.yaml", _overrides(tmp_path / "ref", catalogue, tiny_models))
    durations = {stage: run_stage(reference, stage).seconds for stage in STAGES}
    kills = []
    for stage in STAGES:
        cmd = _command(tmp_path / "drill", catalogue, tiny_models, stage)
        proc = _start(cmd, ray_dirs["drill"])
        delay = rng.uniform(0.3, 0.95) * (STARTUP_S + durations[stage])
        time.sleep(delay)
        finished = proc.poll() is not None
        kill_all(proc, ray_dirs["drill"])
        kills.append((stage, round(delay, 1), "finished first" if finished else "killed"))
        _run(cmd, ray_dirs["drill"])  # the rerun after the crash
    print(f"[drill] seed {seed}: " + ", ".join(f"{s} at {d}s ({what})" for s, d, what in kills))
    assert sum(what == "killed" for _, _, what in kills) >= 3, kills
    ref, drill = _tables(tmp_path / "ref" / "lake"), _tables(tmp_path / "drill" / "lake")
    for table in KEYS:
        _same(ref[table], drill[table], table)
    assert len(ref["rankings"]) == 4 * 5 and len(ref["embeddings"]) == 24
