"""The ``hfedmoe`` command."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

from hfedmoe.config import ConfigError, load_config_file, parse_assignment, parse_run_config
from hfedmoe.deploy_cli import add_deploy_parser
from hfedmoe.use_cli import add_use_parsers

EPILOG = """\
examples:
  hfedmoe run                                   # embedded MiniLM-MoE on BBC News, 8 clients
  hfedmoe run --config conf/tiny.toml           # tiny random MoE, under a minute
  hfedmoe run --config conf/tiny-lm.toml        # tiny causal-LM MoE, instruction tuning
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
    _add_config_options(run)
    run.add_argument("--out", metavar="DIR",
                     help="output directory (same as --set out=DIR; default runs/default)")
    run.add_argument("--verbose", action="store_true",
                     help="also show Flower's own log (INFO level)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR from its last complete checkpoint (its "
                          "config.toml; --set may change num-server-rounds, simulation.*, "
                          "checkpoint.* and the federation timeouts)")
    comp = commands.add_parser(
        "compare", help="run several methods side by side",
        description="Run each method (and each seed) with otherwise identical configuration - "
                    "same data, partitions, budgets, local steps, evaluation - and write "
                    "comparison.json, comparison.md and plots to --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    comp.add_argument("--methods", required=True, metavar="A,B,...",
                      help="comma-separated methods, e.g. hfedmoe,fedavg,random-subset")
    _add_config_options(comp)
    comp.add_argument("--seeds", type=int, default=1, metavar="N",
                      help="repeat over seeds seed, seed+1, ..., seed+N-1 (default 1)")
    comp.add_argument("--target", type=float, default=0.9, metavar="ACC",
                      help="target test accuracy for rounds/seconds to target (default 0.9)")
    comp.add_argument("--out", metavar="DIR", required=True, help="output directory")
    comp.add_argument("--verbose", action="store_true", help="also show Flower's own log")
    bench = commands.add_parser(
        "bench", help="measure what expert budgets save",
        description="Benchmarks that print measured figures.")
    benches = bench.add_subparsers(dest="bench", required=True)
    step = benches.add_parser(
        "step", help="step time and peak memory at several budgets vs full training",
        description="Train client 0 of the configured run for a few local steps at full "
                    "training and under HFedMoE at each budget, interleaved over repeats in "
                    "one process; print median step time and peak training memory as ratios "
                    "to full training.")
    _add_config_options(step)
    step.add_argument("--budgets", default="6,12,24,48", metavar="LIST",
                      help="comma-separated budgets (experts over all layers); default 6,12,24,48")
    step.add_argument("--steps", type=int, default=5, help="local steps per measurement")
    step.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    step.add_argument("--json", metavar="FILE",
                      help="also write the rows as JSON: {\"meta\": ..., \"rows\": [{\"budget\": "
                           "int, \"step_time_ratio\": float, \"peak_memory_ratio\": float, "
                           "\"backward_flops_ratio\": float, \"ideal_ratio\": float, ...}]}")
    step.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    step.add_argument("--out", metavar="DIR", help=argparse.SUPPRESS)
    scale = benches.add_parser(
        "scale", help="round time, bytes and memory vs connected clients",
        description="For each runtime and each number N of connected clients, run the "
                    "configured experiment (a fresh process each) with K clients sampled per "
                    "round for training and evaluation (IID partitions), one after another; "
                    "print per run the round time, bytes per round, the server's and the client "
                    "processes' peak memory and the clients' resident memory after each round "
                    "(docs/scaling.md).")
    _add_config_options(scale)
    scale.add_argument("--clients", default="10,100,1000", metavar="LIST",
                       help="comma-separated numbers of connected clients N (default "
                            "10,100,1000)")
    scale.add_argument("--sampled", type=int, default=10, metavar="K",
                       help="clients sampled per round, for training and for evaluation "
                            "(default 10)")
    scale.add_argument("--rounds", type=int, default=2, help="rounds per run (default 2)")
    scale.add_argument("--runtimes", default="inprocess,ray", metavar="LIST",
                       help="comma-separated simulation.runtime values (default inprocess,ray)")
    scale.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    scale.add_argument("--out", metavar="DIR",
                       help="keep each run in DIR/<runtime>-n<N> (default: a temporary "
                            "directory, removed)")
    scale.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    add_deploy_parser(commands)
    add_use_parsers(commands)
    return parser


def _add_config_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", metavar="FILE", action="append", default=[],
                         help="TOML experiment file overriding the defaults (tables allowed, "
                              "e.g. [model] name = ...); repeat to layer several, later wins")
    command.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                         dest="overrides",
                         help="override one config key, e.g. --set train.lr=1e-3 (repeatable; "
                              "applied after --config files)")


def resolve_config(args: argparse.Namespace):
    if getattr(args, "resume", None):
        return _resume_config(args)
    layers = [load_config_file(path) for path in args.config]
    layers.append(dict(parse_assignment(text) for text in args.overrides))
    if args.out:
        layers.append({"out": args.out})
    config = parse_run_config(*layers)
    return parse_run_config(*layers, {"out": str(Path(config.out).resolve())})


def _resume_config(args: argparse.Namespace):
    """The configuration of the run in ``--resume DIR``, continued from its checkpoints."""
    if args.config or args.out:
        raise ConfigError("--resume DIR takes the run's own DIR/config.toml; --config and "
                          "--out cannot be combined with it")
    directory = Path(args.resume).resolve()
    saved = load_config_file(directory / "config.toml")
    overrides = dict(parse_assignment(text) for text in args.overrides)
    return parse_run_config(saved, overrides, {"out": str(directory), "checkpoint.resume": True})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "deploy":
        return _deploy(args)
    from hfedmoe.runner import prepare_environment, run_experiment

    prepare_environment(getattr(args, "verbose", False))  # before transformers reads the env
    if args.command in ("generate", "predict"):
        from hfedmoe.use_cli import run_use

        return run_use(args)
    from hfedmoe.data import DataError
    from hfedmoe.model import ModelNotFoundError, UnsupportedModelError
    from hfedmoe.progress import plural
    from hfedmoe.report import nothing_learned_reason

    try:
        config = resolve_config(args)
        if args.command == "bench" and args.bench == "scale":
            return _bench_scale(config, args)
        if args.command == "bench":
            return _bench_step(config, args)
        if args.command == "compare":
            return _compare(config, args)
        summary = run_experiment(config, verbose=args.verbose)
    except (ConfigError, DataError, UnsupportedModelError, ModelNotFoundError) as exc:
        print(f"hfedmoe: error: {exc}", file=sys.stderr)
        return 2
    reason = nothing_learned_reason(summary)
    if reason:
        print(f"hfedmoe: error: {reason} in {config.out}", file=sys.stderr)
        return 1
    language = (f", perplexity {summary['final_perplexity']:.2f}"
                if summary.get("final_perplexity") is not None else "")
    print(f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f})"
          f"{language} after {plural(summary['rounds'], 'round')} in "
          f"{summary['wall_seconds']:.0f} s; outputs in {config.out}")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from hfedmoe.deploy_cli import run_deploy

    try:
        return run_deploy(args)
    except (ConfigError, OSError, TimeoutError, RuntimeError) as exc:
        print(f"hfedmoe: error: {exc}", file=sys.stderr)
        return 2


def _compare(config, args: argparse.Namespace) -> int:
    from hfedmoe.compare import compare, comparison_table
    from hfedmoe.config import METHODS
    from hfedmoe.runner import run_experiment

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(METHODS)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: expected an integer >= 1")
    if not math.isfinite(args.target):
        raise ConfigError(f"--target {args.target}: expected a finite accuracy")
    seeds = [config.seed + i for i in range(args.seeds)]
    result = compare(config, methods, seeds, Path(config.out), args.target,
                     lambda c: run_experiment(c, verbose=args.verbose))
    print(comparison_table(result), end="")
    print(f"outputs in {config.out}")
    idle = [f"{name} (seed {seed})" for name, m in result["methods"].items()
            for seed, rounds in zip(result["seeds"], m["trained_rounds"]["values"]) if rounds == 0]
    if idle:
        print(f"hfedmoe: error: no round aggregated a trained update in {', '.join(idle)}; "
              "see their metrics.jsonl", file=sys.stderr)
        return 1
    return 0


def _bench_step(config, args: argparse.Namespace) -> int:
    import torch

    from hfedmoe.bench import (
        bench_step,
        calibration_of,
        format_profiles,
        format_rows,
        write_json,
    )

    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise ConfigError(f"--budgets '{args.budgets}': expected integers like 6,12,24") from None
    if args.steps < 1 or args.repeats < 1 or min(budgets) < 1:
        raise ConfigError("--steps, --repeats and every budget must be >= 1")
    from hfedmoe.calibration import training_setup
    from hfedmoe.fingerprint import model_fingerprint

    torch.set_num_threads(config.simulation.client_cpus)
    meta = {"model": config.model.name, "model_fingerprint": model_fingerprint(config.model),
            "batch_size": config.train.batch_size,
            "max_length": config.model.max_length, "steps": args.steps,
            "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
            "budget_mode": config.budget.mode, "setup": training_setup(config)}
    print(f"model {config.model.name}, batch {config.train.batch_size} x "
          f"{config.model.max_length} tokens, {args.steps} steps x {args.repeats} repeats, "
          f"{torch.get_num_threads()} torch threads, budget.mode {config.budget.mode}")
    report = bench_step(config, budgets, args.steps, args.repeats)
    print(format_rows(report.rows))
    print(f"floor: with no expert learning a step still costs {report.floor_flops_ratio:.2f}x "
          f"of full training's FLOPs (forward, frozen attention and routers' backward)")
    print(format_profiles(calibration_of(report, meta), report.min_budget))
    if args.json:
        write_json(report, Path(args.json), meta)
    return 0


def _bench_scale(config, args: argparse.Namespace) -> int:
    import json
    import tempfile

    from hfedmoe.bench_scale import BenchRunError, format_table, measure_run, run_settings

    try:
        clients = [int(n) for n in args.clients.split(",")]
    except ValueError:
        raise ConfigError(f"--clients '{args.clients}': expected integers like 10,100") from None
    if min(clients) < 1 or args.sampled < 1 or args.rounds < 1:
        raise ConfigError("--clients, --sampled and --rounds must be >= 1")
    runtimes = args.runtimes.split(",")
    layers = [load_config_file(path) for path in args.config]
    layers.append(dict(parse_assignment(text) for text in args.overrides))
    for runtime in runtimes:  # every run's configuration is valid before the first starts
        for n in clients:
            parse_run_config(*layers, run_settings(runtime, n, args.sampled, args.rounds))
    rows: list[dict] = []
    print(format_table(rows), flush=True)  # the header; a row as each run ends
    with tempfile.TemporaryDirectory(prefix="hfedmoe-bench-scale-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        for runtime in runtimes:
            for n in clients:
                try:
                    rows.append(measure_run(args.config, args.overrides, runtime, n,
                                            args.sampled, args.rounds, root / f"{runtime}-n{n}"))
                except BenchRunError as exc:
                    print(f"hfedmoe: error: {exc}", file=sys.stderr)
                    return 1
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config.to_flat(), "rows": rows},
                                              indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
