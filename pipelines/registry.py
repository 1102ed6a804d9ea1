"""The stage registry: every stage once, with its one-line help and where its code is.

The command line, `nightly` and the infra test read this table; nothing else lists
stages. A stage is a function `run(ctx: RunContext) -> Summary` in its own module of
`pipelines/`; the module is imported only when the stage runs (so that loading the
registry costs nothing), and no stage module imports another (tests/test_layout.py).
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    module: str
    function: str = "run"

    def run(self, ctx):
        """Runs the stage in `ctx` and returns its Summary, timed from start to end."""
        fn = getattr(importlib.import_module(f"pipelines.{self.module}"), self.function)
        started = time.monotonic()
        summary = fn(ctx)
        summary.seconds = round(time.monotonic() - started, 1)
        return summary


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "synth",
            "draw the synthetic world: catalogue images, manifest, triplets, queries (and the demo's models)",
            "synthetic",
        ),
        Stage("ingest", "manifest -> images table", "ingest"),
        Stage(
            "caption", "images -> captions table (only images without a caption for their bytes)", "caption"
        ),
        Stage(
            "finetune_embedder",
            "Ray Train: MVFT-JI's joint contrastive fine-tuning of the embedder on captions and triplets",
            "finetune",
        ),
        Stage("embed", "images + captions -> embeddings table (kinds image and pair)", "embed"),
        Stage("triplets", "edit triplets -> triplet_embeddings (Stage 2's inputs, incremental)", "triplets"),
        Stage(
            "conditions",
            "pairs -> stage1_examples with text tokens (train.text_conditions: precomputed)",
            "conditions",
        ),
        Stage(
            "train_stage1",
            "Ray Train: the prior on embeddings[pair] (resumes its run)",
            "train",
            "run_stage1",
        ),
        Stage(
            "train_stage2",
            "Ray Train: the Control-Adapter on triplet_embeddings, prior frozen",
            "train",
            "run_stage2",
        ),
        Stage("index", "the LanceDB vector index over the gallery (built or refreshed)", "index"),
        Stage(
            "rank",
            "queries -> top-k gallery images in the lake's rankings (rank.mode picks the method)",
            "rank",
        ),
        Stage(
            "report",
            "the results page of the run: sample queries, their top images, the stages' lines",
            "report",
        ),
        Stage(
            "compact",
            "upkeep: the Lance tables' fragments compacted, scalar indices refreshed, old versions removed",
            "compact",
        ),
    )
}

# Commands that are not stages: they run stages (nightly, demo, benchmark) or read files.
COMMANDS = {
    "nightly": "the stages of nightly.stages in order, resuming a killed run at its stage",
    "demo": "synth, then `nightly` on conf/demo.yaml (the whole DAG, training included), then `benchmark`",
    "evaluate": "metrics (and test-server files) of a rankings file on CIRR, FashionIQ or CIRCO",
    "benchmark": "a benchmark end to end (conf/eval/*.yaml): its images through the stages, every rank mode, "
    "metrics",
    "preflight": "before any GPU-hour: models' configs, processors and tokenizers (no weights), dims, memory "
    "per actor, the store, the cluster; one OK/PROBLEM table, non-zero exit on a problem",
    "plan": "GPU-hours and wall time of each GPU stage for a catalogue size (--images, --queries, --gpus), "
    "from the per-GPU rates of conf plan",
}

# Modules that hold a stage or a command that runs stages: none of them imports another
# (tests/test_layout.py). `evaluate` is the benchmarks' formats and metrics, a library.
STAGE_MODULES = sorted({s.module for s in STAGES.values()} | {"nightly", "benchmark"})
