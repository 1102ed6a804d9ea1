"""python -m pipelines <stage> --config conf/X.yaml [key=value ...]"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pipelines.config import ConfigError, load_config

STAGES = ("synth", "ingest", "caption", "embed", "triplets", "conditions", "train_stage1", "train_stage2",
          "index", "rank", "nightly", "demo")
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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(f"  {k:8s} {v}" for k, v in HELP.items()))
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", action="append", default=None,
                        help="deployment config (conf/demo.yaml, conf/prod.yaml); repeat to layer files")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. caption.batch_size=4")
    args = parser.parse_intermixed_args(argv)
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

    try:
        cfg = load_config(args.config, args.overrides)
        if args.stage == "synth":
            from pipelines.synthetic import synth

            synth(cfg)
        elif args.stage in ("nightly", "demo"):
            from pipelines import nightly

            state = nightly.run(cfg)
            if args.stage == "demo":
                print(f"[demo] rankings: {cfg.storage.root}/rankings/ (Parquet by run date) and "
                      f"{cfg.storage.root}/rankings.lance, run {state['run_id']}")
                print(f"[demo] results page: {cfg.report.dir}/index.html")
                print("[demo] the models are tiny and random: the rankings carry no meaning; they show that "
                      "every stage runs on real components")
        elif args.stage.startswith("train_"):
            from pipelines import train

            print(train.run(cfg, args.stage.removeprefix("train_")).line())
        else:
            import importlib

            print(importlib.import_module(f"pipelines.{args.stage}").run(cfg).line())
    except (ConfigError, ManifestError, EmbeddingSizeError, TableError, ImageRejected, TrainingError,
            CheckpointMismatch, RankError, NightlyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
