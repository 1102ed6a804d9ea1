"""cirpipe <stage> --config LAYER_OR_FILE [key=value ...]   (or: python -m pipelines <stage> ...)

--config takes a file (my_catalogue.yaml) or a shipped layer by name (demo, prod,
catalogue, eval/cirr); repeat it to layer several."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pipelines.quiet import quiet_logs
from pipelines.registry import COMMANDS, STAGES


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusiondiff-pipeline")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    helps = {**{name: s.help for name, s in STAGES.items()}, **COMMANDS}
    parser = argparse.ArgumentParser(prog="cirpipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(f"  {k:13s} {v}" for k, v in helps.items()))
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("stage", choices=list(helps))
    parser.add_argument("--config", action="append", default=None,
                        help="a config file, or a shipped layer by name (demo, prod, catalogue); "
                             "repeat to layer them")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and the libraries' own logs (also: log.verbose=true)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. caption.batch_size=4")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what would be processed (new, changed, unchanged, rejected rows) without "
                             "running a model or writing anything")
    ev = parser.add_argument_group("evaluate")
    ev.add_argument("--benchmark", choices=("cirr", "fashioniq", "circo"))
    ev.add_argument("--annotations", help="the benchmark's root folder, in its official layout")
    ev.add_argument("--rankings", help="Parquet with query_id, rank (1-based), image_id, score")
    ev.add_argument("--split", default="val")
    ev.add_argument("--out", default="metrics.json")
    ev.add_argument("--submission", help="folder for the test server's files")
    ev.add_argument("--image-root", help="the images' root (default: the benchmark's official layout: "
                    "CIRCO's dataset root, else <annotations>/images)")
    pl = parser.add_argument_group("plan")
    pl.add_argument("--images", type=int, help="catalogue images")
    pl.add_argument("--queries", type=int, default=0, help="composed queries ranked per night")
    pl.add_argument("--triplets", type=int, help="Stage 2 triplets (default: one per image)")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs the stages spread over")
    args = parser.parse_intermixed_args(argv)
    if args.stage == "plan" and args.images is None:
        parser.error("plan needs --images (and --queries, --gpus)")
    if args.stage == "evaluate" and not (args.benchmark and args.annotations and args.rankings):
        parser.error("evaluate needs --benchmark, --annotations and --rankings")
    if args.stage == "demo" and args.config is None:
        args.config = ["demo"]
    if args.verbose:
        args.overrides.append("log.verbose=true")
    return args


def run_command(args: argparse.Namespace) -> None:
    """One command: the config checked whole before anything starts; a command that
    writes the lake holds its lock (one writer per lake) for its whole run."""
    from pipelines.config import load_config
    from pipelines.context import RunContext, new_run_id
    from pipelines.lock import lake_lock

    if args.stage == "evaluate":
        from pipelines import evaluate

        evaluate.main(args)
        return
    cfg = load_config(args.config, args.overrides)
    quiet_logs(cfg.log.verbose)  # the config may turn it on
    if args.stage == "plan":  # reads nothing, writes nothing
        from pipelines.plan import plan, render

        print(render(plan(cfg, args.images, args.queries, args.triplets), args.gpus))
        return
    if args.stage == "preflight":  # reads, writes one probe file and removes it: no lock
        from pipelines import preflight

        preflight.run(RunContext.create(cfg))
        return
    run_id = cfg.rank.run_id or new_run_id()
    if args.dry_run:  # writes nothing: no lock
        if args.stage in ("nightly", "demo", "benchmark"):
            from pipelines import nightly

            nightly.run(cfg, dry_run=True)
        else:
            print(STAGES[args.stage].run(RunContext.create(cfg, run_id, dry_run=True)).line())
        return
    with lake_lock(cfg, run_id, args.stage):
        run_writer(args, cfg, run_id)


def run_writer(args: argparse.Namespace, cfg, run_id: str) -> None:
    """A command that writes the lake (the caller holds the lake's lock)."""
    from pipelines.config import load_config
    from pipelines.context import RunContext

    if args.stage in ("nightly", "demo"):
        from pipelines import nightly
        from pipelines.synthetic import build_demo_models

        if args.stage == "demo":
            from pipelines import preflight

            build_demo_models(cfg)
            preflight.run(RunContext.create(cfg, run_id))
        state = nightly.run(cfg)
        if args.stage == "demo":
            from pipelines import benchmark

            # The same catalogue in CIRR's layout: every rank mode, side by side.
            bench = load_config([*args.config, "eval/demo_cirr"], args.overrides)
            print(benchmark.run(RunContext.create(bench)))
            print(f"[demo] rankings: {cfg.storage.root}/rankings/ (Parquet by run date) and "
                  f"{cfg.storage.root}/rankings.lance, run {state['run_id']}")
            print(f"[demo] results page: {cfg.report.dir}/index.html")
            print("[demo] the models are tiny ones taught the synthetic world on this machine: the table "
                  "above measures the method in miniature, not the paper's checkpoints")
    elif args.stage == "benchmark":
        from pipelines import benchmark

        print(benchmark.run(RunContext.create(cfg)))
    else:
        print(STAGES[args.stage].run(RunContext.create(cfg, run_id)).line())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs(args.verbose)  # before Ray, Lance or transformers load and read their environment
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from model.errors import find_pipeline_error
    from pipelines.quiet import ray_logs_folder

    try:
        run_command(args)
    except Exception as e:  # a refusal, here or inside a Ray actor or task: one line, exit 2
        refused, logs = find_pipeline_error(e), ray_logs_folder()
        if refused is None:  # our bug: its traceback, and where Ray's processes logged
            if logs:
                print(f"full logs of every Ray process: {logs}", file=sys.stderr)
            raise
        print(f"error: {refused}", file=sys.stderr)
        if logs:
            print(f"full logs of every Ray process: {logs}", file=sys.stderr)
        return 2
    return 0


def console() -> None:
    """The `cirpipe` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console()
