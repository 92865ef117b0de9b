"""The ``hfedmoe`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from hfedmoe.config import ConfigError, load_config_file, parse_assignment, parse_run_config

EPILOG = """\
examples:
  hfedmoe run                                   # embedded MiniLM-MoE on BBC News, 8 clients
  hfedmoe run --config conf/tiny.toml           # tiny random MoE, under a minute
  hfedmoe run --set num-server-rounds=3 --set data.dirichlet-alpha=0.1 --out runs/a01
Every key, its default and allowed values: docs/configuration.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfedmoe",
        description="Federated fine-tuning of Mixture-of-Experts models on heterogeneous "
                    "clients (HFedMoE) on Flower.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run one federated experiment",
        description="Run one federated fine-tuning experiment and write its outputs "
                    "(config.toml, metrics.jsonl, summary.json, accuracy.png, loss.png) to the "
                    "output directory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", metavar="FILE", action="append", default=[],
                     help="TOML experiment file overriding the defaults (tables allowed, e.g. "
                          "[model] name = ...); repeat to layer several files, later wins")
    run.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                     help="override one config key, e.g. --set train.lr=1e-3 (repeatable; "
                          "applied after --config files)")
    run.add_argument("--out", metavar="DIR",
                     help="output directory (same as --set out=DIR; default runs/default)")
    run.add_argument("--verbose", action="store_true",
                     help="also show Flower's own log (INFO level)")
    return parser


def resolve_config(args: argparse.Namespace):
    layers = [load_config_file(path) for path in args.config]
    layers.append(dict(parse_assignment(text) for text in args.overrides))
    if args.out:
        layers.append({"out": args.out})
    config = parse_run_config(*layers)
    return parse_run_config(*layers, {"out": str(Path(config.out).resolve())})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hfedmoe.runner import prepare_environment, run_experiment

    prepare_environment(args.verbose)  # before transformers is imported: it reads the env once
    from hfedmoe.data import DataError
    from hfedmoe.model import ModelNotFoundError, UnsupportedModelError

    try:
        config = resolve_config(args)
        summary = run_experiment(config, verbose=args.verbose)
    except (ConfigError, DataError, UnsupportedModelError, ModelNotFoundError) as exc:
        print(f"hfedmoe: error: {exc}", file=sys.stderr)
        return 2
    print(f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}) "
          f"after {summary['rounds']} rounds in {summary['wall_seconds']:.0f} s; "
          f"outputs in {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
