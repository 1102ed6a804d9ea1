"""python -m pipelines <stage> --config conf/X.yaml [key=value ...]"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pipelines.config import ConfigError, load_config

STAGES = ("synth", "ingest", "caption", "embed", "triplets", "conditions", "train_stage1", "train_stage2",
          "index", "rank", "nightly", "demo", "evaluate", "benchmark")
HELP = {
    "synth": "draw the synthetic catalogue (images, manifest, triplets, queries)",
    "ingest": "manifest -> images table",
    "caption": "images -> captions table (only images without a caption for their bytes)",
    "embed": "images + captions -> embeddings table (kinds image and pair)",
    "triplets": "edit triplets -> triplet_embeddings (Stage 2's inputs, incremental)",
    "conditions": "pairs -> stage1_examples with text tokens (train.text_conditions: precomputed)",
    "train_stage1": "Ray Train: the prior on embeddings[pair] (resumes its run)",
    "train_stage2": "Ray Train: the Control-Adapter on triplet_embeddings, prior frozen",
    "index": "the LanceDB vector index over the gallery (built or refreshed)",
    "rank": "queries -> top-k gallery images in the lake's rankings (rank.mode picks the method)",
    "nightly": "the stages of nightly.stages in order, resuming a killed run at its stage",
    "demo": "`nightly` on conf/demo.yaml (the whole DAG, training included), then says where everything is",
    "evaluate": "metrics (and test-server files) of a rankings file on CIRR, FashionIQ or CIRCO",
    "benchmark": "a benchmark end to end (conf/eval/*.yaml): its images through the stages, every rank mode, metrics",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(f"  {k:8s} {v}" for k, v in HELP.items()))
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", action="append", default=None,
                        help="deployment config (conf/demo.yaml, conf/prod.yaml); repeat to layer files")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. caption.batch_size=4")
    ev = parser.add_argument_group("evaluate")
    ev.add_argument("--benchmark", choices=("cirr", "fashioniq", "circo"))
    ev.add_argument("--annotations", help="the benchmark's root folder, in its official layout")
    ev.add_argument("--rankings", help="Parquet with query_id, rank (1-based), image_id, score")
    ev.add_argument("--split", default="val")
    ev.add_argument("--out", default="metrics.json")
    ev.add_argument("--submission", help="folder for the test server's files")
    ev.add_argument("--image-root", help="the images' root (default: <annotations>/images)")
    args = parser.parse_intermixed_args(argv)
    if args.stage == "evaluate" and not (args.benchmark and args.annotations and args.rankings):
        parser.error("evaluate needs --benchmark, --annotations and --rankings")
    if args.stage == "demo" and args.config is None:
        args.config = ["conf/demo.yaml"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from model.checkpoints import CheckpointMismatch
    from ops.images import ImageRejected
    from ops.embed import EmbeddingSizeError
    from pipelines.ingest import ManifestError
    from pipelines.lake import TableError
    from pipelines.train import TrainingError
    from ops.rank import RankError
    from pipelines.nightly import NightlyError

    from ops.metrics import MetricsError
    from pipelines.evaluate import AnnotationError

    try:
        if args.stage == "evaluate":
            from pipelines import evaluate

            return evaluate.main(args)
        cfg = load_config(args.config, args.overrides)
        if args.stage == "synth":
            from pipelines.synthetic import synth

            synth(cfg)
        elif args.stage in ("nightly", "demo"):
            from pipelines import nightly

            state = nightly.run(cfg)
            if args.stage == "demo":
                from pipelines import benchmark

                # The same catalogue in CIRR's layout: every rank mode, side by side.
                bench_cfg = load_config([*args.config, "conf/eval/demo_cirr.yaml"], args.overrides)
                print(benchmark.run(bench_cfg))
                print(f"[demo] rankings: {cfg.storage.root}/rankings/ (Parquet by run date) and "
                      f"{cfg.storage.root}/rankings.lance, run {state['run_id']}")
                print(f"[demo] results page: {cfg.report.dir}/index.html")
                print("[demo] the models are tiny and random: the rankings carry no meaning; they show that "
                      "every stage runs on real components")
        elif args.stage == "benchmark":
            from pipelines import benchmark

            print(benchmark.run(cfg))
        elif args.stage.startswith("train_"):
            from pipelines import train

            print(train.run(cfg, args.stage.removeprefix("train_")).line())
        else:
            import importlib

            print(importlib.import_module(f"pipelines.{args.stage}").run(cfg).line())
    except (ConfigError, ManifestError, EmbeddingSizeError, TableError, ImageRejected, TrainingError,
            CheckpointMismatch, RankError, NightlyError, MetricsError, AnnotationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
