"""`python -m pipelines plan`: what a catalogue costs on GPUs before any GPU-hour is spent.

Work per GPU stage (tokens, items, samples, queries, FLOP) for the given catalogue,
divided by the per-GPU rates of conf `plan` (each with its source), as GPU-hours and as
wall time on the given GPUs. Wall time assumes the stage spreads evenly over the GPUs
(the data stages do; training is data-parallel), so it is a lower bound.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.errors import PipelineError
from ops.rank import needs
from ops.triplets import DESCRIBED


class PlanError(PipelineError):
    """A catalogue size or GPU count that cannot be planned."""


@dataclass
class PlanRow:
    stage: str
    work: float
    unit: str
    per_s: float
    source: str

    @property
    def gpu_hours(self) -> float:
        return self.work / self.per_s / 3600


def plan(cfg, images: int, queries: int, triplets: int | None = None) -> list[PlanRow]:
    """The GPU stages' work for `images` catalogue images and `queries` composed queries
    (Stage 2 trains on `triplets`, by default one per image)."""
    for name, value in (("--images", images), ("--queries", queries), ("--triplets", triplets)):
        if value is not None and value < 0:
            raise PlanError(f"plan {name}={value}: expected a count >= 0")
    triplets = images if triplets is None else triplets
    p, dim = cfg.plan, cfg.models.embedder.dim

    def row(stage, work, unit, rate):
        return PlanRow(stage, float(work), unit, float(rate.per_s), str(rate.source))

    # With train_stage2.condition_text: described the triplets stage runs the describer
    # once per triplet (rank's length).
    described = (
        [row("triplets (describe)", triplets * cfg.rank.describe_max_new_tokens, "tokens", p.describe)]
        if cfg.train_stage2.condition_text == DESCRIBED else []
    )
    # Rank's describer writes T~ for each query in the modes that read it (ops/rank.py needs).
    rank_describe = (
        [row("rank (describe)", queries * cfg.rank.describe_max_new_tokens, "tokens", p.describe)]
        if "describer" in needs(cfg.rank.mode, cfg.rank.text_query) else []
    )
    return [
        row("caption", images * cfg.caption.max_new_tokens_long, "tokens", p.caption),
        row("embed", images, "images", p.embed),
        # Two fused embeddings a triplet: z_{r,Delta} and z_t.
        row("triplets (embed)", 2 * triplets, "images", p.embed),
        *described,
        row("train_stage1", images * cfg.train_stage1.epochs, "samples", p.train_stage1),
        row("train_stage2", triplets * cfg.train_stage2.epochs, "samples", p.train_stage2),
        *rank_describe,
        row("rank (sampling)", queries, "queries", p.sample),
        row("rank (exact search)", 2.0 * queries * images * dim, "FLOP", p.search),
    ]


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} d"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.1f} min"


def render(rows: list[PlanRow], gpus: int) -> str:
    if gpus < 1:
        raise PlanError(f"plan --gpus={gpus}: expected at least 1 GPU")
    head = (f"{'stage':20s} {'work':>12s} {'unit':8s} {'per GPU/s':>10s} {'GPU-hours':>10s} "
            f"{'wall':>9s}  source")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.stage:20s} {r.work:12.3g} {r.unit:8s} {r.per_s:10.3g} {r.gpu_hours:10.1f} "
                     f"{_duration(r.gpu_hours / gpus):>9s}  {r.source}")
    total = sum(r.gpu_hours for r in rows)
    wall = _duration(total / gpus)
    lines.append(f"[plan] {len(rows)} GPU stages: {total:.1f} GPU-hours, {wall} on {gpus} GPU(s)")
    return "\n".join(lines)
