"""`python -m pipelines plan`: the GPU bill of a catalogue from conf plan's per-GPU rates."""
import subprocess
import sys

import pytest

from pipelines.config import load_config
from pipelines.plan import PlanError, plan, render

pytestmark = pytest.mark.fast


def test_plan_multiplies_the_work_of_each_stage_by_its_rate():
    cfg = load_config("conf/prod.yaml", ["plan.caption.per_s=100", "plan.search.per_s=1e12"])
    rows = {r.stage: r for r in plan(cfg, images=1000, queries=10)}
    # 1000 long captions of caption.max_new_tokens_long tokens at 100 tokens/s.
    assert rows["caption"].work == 1000 * cfg.caption.max_new_tokens_long
    assert rows["caption"].gpu_hours == pytest.approx(1000 * cfg.caption.max_new_tokens_long / 100 / 3600)
    assert rows["train_stage1"].work == 1000 * cfg.train_stage1.epochs
    assert rows["train_stage2"].work == 1000 * cfg.train_stage2.epochs  # one triplet per image by default
    assert rows["rank (exact search)"].work == 2 * 10 * 1000 * cfg.models.embedder.dim
    by_stage = {r.stage: r for r in plan(cfg, images=1000, queries=10, triplets=50)}
    assert by_stage["train_stage2"].work == 50 * cfg.train_stage2.epochs
    assert by_stage["triplets (embed)"].work == 2 * 50  # z_{r,Delta} and z_t
    # The prod's mode (full) reads T~: the describer writes one per query.
    assert rows["rank (describe)"].work == 10 * cfg.rank.describe_max_new_tokens
    query_only = {r.stage for r in plan(load_config("conf/prod.yaml", ["rank.mode=query_only"]), 1000, 10)}
    assert "rank (describe)" not in query_only
    assert "triplets (describe)" not in rows  # the prod's Stage 2 trains on the instruction
    # Stage 2 on the describer's T~: the triplets stage runs the describer, at its own rate.
    described = {r.stage: r for r in plan(
        load_config("conf/prod.yaml", ["plan.describe.per_s=10", "train_stage2.condition_text=described"]),
        images=1000, queries=10, triplets=50)}
    assert described["triplets (describe)"].work == 50 * cfg.rank.describe_max_new_tokens
    assert described["triplets (describe)"].per_s == described["rank (describe)"].per_s == 10
    # Twice the GPUs, half the wall time; the GPU-hours stay.
    one, eight = render(list(rows.values()), 1), render(list(rows.values()), 8)
    total = sum(r.gpu_hours for r in rows.values())
    assert f"{total:.1f} GPU-hours" in one and f"{total:.1f} GPU-hours" in eight and "on 8 GPU(s)" in eight


def test_the_prod_bill_of_33m_images_names_each_rate_source():
    out = subprocess.run([sys.executable, "-m", "pipelines", "plan", "--config", "conf/prod.yaml",
                          "--images", "33000000", "--queries", "1000000", "--gpus", "8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    caption = next(line for line in lines if line.startswith("caption"))
    # 33M captions x 120 tokens at 2,733 tokens/s: about 400 H100-hours.
    assert " 402.5 " in caption and "measured" in caption
    assert "assumed" in next(line for line in lines if line.startswith("train_stage2"))
    assert lines[-1].startswith("[plan] 8 GPU stages")


@pytest.mark.parametrize("call, message", [
    (lambda cfg: plan(cfg, images=-1, queries=0), "plan --images=-1: expected a count >= 0"),
    (lambda cfg: render(plan(cfg, images=1, queries=0), 0), "plan --gpus=0: expected at least 1 GPU"),
])
def test_impossible_plans_are_refused_in_one_line(call, message):
    with pytest.raises(PlanError, match=message):
        call(load_config("conf/prod.yaml"))
