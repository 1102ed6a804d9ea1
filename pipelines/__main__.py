"""python -m pipelines <stage> --config conf/X.yaml [key=value ...]"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pipelines.config import ConfigError, load_config

STAGES = ("synth", "ingest", "caption", "embed", "triplets", "conditions", "train_stage1", "train_stage2",
          "run", "demo")
HELP = {
    "synth": "draw the synthetic catalogue (images, manifest, triplets, queries)",
    "ingest": "manifest -> images table",
    "caption": "images -> captions table (only images without a caption for their bytes)",
    "embed": "images + captions -> embeddings table (kinds image and pair)",
    "triplets": "edit triplets -> triplet_embeddings (Stage 2's inputs, incremental)",
    "conditions": "pairs -> stage1_examples with text tokens (train.text_conditions: precomputed)",
    "train_stage1": "Ray Train: the prior on embeddings[pair] (resumes its run)",
    "train_stage2": "Ray Train: the Control-Adapter on triplet_embeddings, prior frozen",
    "run": "the whole DAG so far: [synth], ingest, caption, embed",
    "demo": "`run` on conf/demo.yaml, then says where everything is",
}


def synth(cfg) -> None:
    from pipelines.synthetic import make_catalogue

    s = cfg.synthetic
    uris = make_catalogue(s.out_dir, s.num_images, s.image_size, s.num_triplets, s.num_queries, cfg.seed,
                          dict(cfg.storage.s3))
    print(f"[synth] {s.num_images} images, {s.num_triplets} triplets, {s.num_queries} queries: {uris['manifest']}")


def run_dag(cfg) -> None:
    from pipelines import caption, embed, ingest
    from pipelines.common import prepare_models
    from ops.storage import filesystem

    t0 = time.monotonic()
    if cfg.synthetic.enabled:
        fs, path = filesystem(cfg.catalogue.manifest, dict(cfg.storage.s3))
        if fs.get_file_info(path).type.name == "NotFound":
            synth(cfg)
    prepare_models(cfg)
    for stage in (ingest, caption, embed):
        print(stage.run(cfg).line(), flush=True)
    print(f"[run] done in {time.monotonic() - t0:.1f}s; tables under {cfg.storage.root}")


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

    try:
        cfg = load_config(args.config, args.overrides)
        if args.stage == "synth":
            synth(cfg)
        elif args.stage in ("run", "demo"):
            run_dag(cfg)
            if args.stage == "demo":
                print(f"[demo] tables: {cfg.storage.root}/{{images,captions,embeddings,rejects}}.lance")
                print("[demo] the models are tiny and random: the captions and vectors carry no meaning, "
                      "they show that every stage runs on real components")
        elif args.stage.startswith("train_"):
            from pipelines import train

            print(train.run(cfg, args.stage.removeprefix("train_")).line())
        else:
            import importlib

            print(importlib.import_module(f"pipelines.{args.stage}").run(cfg).line())
    except (ConfigError, ManifestError, EmbeddingSizeError, TableError, ImageRejected, TrainingError,
            CheckpointMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
