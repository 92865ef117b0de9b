"""``hfedmoe compare``: several methods on the same data, partitions, budgets and seeds.

Each (method, seed) is an ordinary run (``DIR/<method>/seed-<s>/``, with all its outputs); only
``method`` and ``seed`` differ from the given configuration, so partitions, budgets, local
steps and evaluation are identical across methods for a seed. Writes ``comparison.json``
(per method: the summary fields as mean/std/values over seeds, plus ``rounds_to_target``,
``seconds_to_target`` and ``late_accuracy_change``; ``final_personal_accuracy`` is the mean
over clients of each client's accuracy on its own test split, the personalised view beside
the global test accuracy),
``comparison.md`` (a table of the same numbers) and plots.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hfedmoe.config import RunConfig, load_config_file, parse_run_config
from hfedmoe.client import load_usable_corpus
from hfedmoe.fingerprint import first_difference, input_fingerprints
from hfedmoe.model import load_tokenizer
from hfedmoe.plots import plot_comparison
from hfedmoe.report import CONFIG_FILE, INPUTS_FILE, SUMMARY_FILE

SCALAR_FIELDS = ("final_accuracy", "final_personal_accuracy", "best_accuracy",
                 "rounds_to_target", "seconds_to_target", "bytes_up", "bytes_down",
                 "wall_seconds", "trained_rounds", "late_accuracy_change")
# causal-lm runs' summaries also have these (hfedmoe.tasks.causal_lm; accuracy is then the
# next-token accuracy on the held-out answers)
LM_FIELDS = ("final_perplexity", "final_personal_perplexity", "final_exact_match",
             "final_rouge_l")


def rounds_to_target(summary: Mapping[str, Any], target: float) -> int | None:
    """First round whose test accuracy reaches ``target`` (None if never)."""
    for round_number, accuracy in enumerate(summary["accuracy_by_round"]):
        if accuracy is not None and accuracy >= target:
            return round_number
    return None


def seconds_to_target(summary: Mapping[str, Any], target: float) -> float | None:
    """Wall seconds of training until the target round (sum of round times; None if never)."""
    reached = rounds_to_target(summary, target)
    if reached is None:
        return None
    return float(sum(s or 0.0 for s in summary["round_seconds_by_round"][: reached + 1]))


def late_accuracy_change(summary: Mapping[str, Any]) -> float | None:
    """How much a run still swings at its end: the mean absolute change of the global test
    accuracy (a fraction in [0, 1]) from one round to the next over the second half of the
    run, rounds ``R // 2 + 1 .. R`` of ``R`` (rounds 11-20 of 20). A round without an
    accuracy (it failed) is left out with both its changes; None if no change is left or the
    run has fewer than 2 rounds. A run that has settled scores near 0 even if it is still
    climbing slowly; one that alternates between two models scores high."""
    accuracy = summary["accuracy_by_round"]  # entry r: after round r (entry 0: initial model)
    rounds = len(accuracy) - 1
    if rounds < 2:
        return None
    changes = [abs(accuracy[r] - accuracy[r - 1]) for r in range(rounds // 2 + 1, rounds + 1)
               if accuracy[r] is not None and accuracy[r - 1] is not None]
    return statistics.fmean(changes) if changes else None


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    present = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else 0.0 if present else None,
        "values": list(values),
    }


def summarise_method(summaries: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """Mean/std over seeds of one method's run summaries (pure)."""
    rows = [{**s, "rounds_to_target": rounds_to_target(s, target),
             "seconds_to_target": seconds_to_target(s, target),
             "late_accuracy_change": late_accuracy_change(s)} for s in summaries]
    by_round = list(zip(*(s["accuracy_by_round"] for s in summaries)))
    fields = SCALAR_FIELDS + tuple(f for f in LM_FIELDS if any(f in s for s in summaries))
    return {
        **{field: _stats([row.get(field) for row in rows]) for field in fields},
        "accuracy_by_round_mean": [statistics.fmean(r) for r in by_round],
        "within_budget": all(c.get("within_budget", True) for s in summaries
                             for c in s["clients"]),
        # the first seed's clients; peak memory and step time as measured in that run
        "clients": [{"client_id": c["client_id"], "budget_experts": c["budget_experts"],
                     "max_active_experts_per_batch": c["max_active_experts_per_batch"],
                     "num_examples": c["num_examples"],
                     "peak_memory_bytes": c.get("peak_memory_bytes"),
                     "mean_step_seconds": c.get("mean_step_seconds")}
                    for c in summaries[0]["clients"]],
    }


def _cell(stats: Mapping[str, Any], scale: float = 1.0, digits: int = 3,
          missing: str = "never") -> str:
    if stats["mean"] is None:
        return missing
    return f"{stats['mean'] / scale:.{digits}f} ± {stats['std'] / scale:.{digits}f}"


def comparison_table(comparison: Mapping[str, Any]) -> str:
    """The Markdown table of ``comparison.json`` (numbers formatted from the same values)."""
    lines = [
        f"Target accuracy: {comparison['target_accuracy']}; seeds: {comparison['seeds']}; "
        "mean ± std over seeds.",
        "",
        "| method | final acc | personal acc | best acc | late change | rounds to target "
        "| s to target | MiB up | MiB down | within budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if any("final_perplexity" in m for m in comparison["methods"].values()):
        return _lm_table(comparison, lines[0])
    none = {"mean": None}  # a field that comparisons written by older versions lack
    for name, m in comparison["methods"].items():
        personal = m.get("final_personal_accuracy", none)
        lines.append(
            f"| {name} | {_cell(m['final_accuracy'])} | {_cell(personal, missing='n/a')} "
            f"| {_cell(m['best_accuracy'])} "
            f"| {_cell(m.get('late_accuracy_change', none), missing='n/a')} "
            f"| {_cell(m['rounds_to_target'], digits=1)} | {_cell(m['seconds_to_target'], digits=0)} "
            f"| {_cell(m['bytes_up'], 2**20, 1)} | {_cell(m['bytes_down'], 2**20, 1)} "
            f"| {'yes' if m['within_budget'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _lm_table(comparison: Mapping[str, Any], heading: str) -> str:
    """Causal-LM comparisons: held-out perplexity (global split; personalised when clients
    hold test splits), exact match and ROUGE-L of the greedy answers, next-token accuracy."""
    none = {"mean": None}
    lines = [heading, "",
             "| method | perplexity | personal perplexity | exact match | ROUGE-L "
             "| next-token acc | MiB up | MiB down | within budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in comparison["methods"].items():
        lines.append(
            f"| {name} | {_cell(m.get('final_perplexity', none), digits=2, missing='n/a')} "
            f"| {_cell(m.get('final_personal_perplexity', none), digits=2, missing='n/a')} "
            f"| {_cell(m.get('final_exact_match', none), missing='n/a')} "
            f"| {_cell(m.get('final_rouge_l', none), missing='n/a')} "
            f"| {_cell(m['final_accuracy'])} "
            f"| {_cell(m['bytes_up'], 2**20, 1)} | {_cell(m['bytes_down'], 2**20, 1)} "
            f"| {'yes' if m['within_budget'] else 'no'} |")
    return "\n".join(lines) + "\n"


def current_inputs(config: RunConfig) -> dict[str, str]:
    """The input fingerprints a run of ``config`` would record (hfedmoe.fingerprint)."""
    corpus = load_usable_corpus(config, load_tokenizer(config.model))
    return input_fingerprints(corpus, config.model)


def finished_run(config: RunConfig, inputs: Mapping[str, str]) -> dict[str, Any] | None:
    """The summary of the finished run of ``config`` in ``config.out``, if there is one whose
    recorded configuration (config.toml) equals ``config`` and whose recorded input
    fingerprints (inputs.json) equal ``inputs``; None otherwise."""
    directory = Path(config.out)
    summary, recorded = directory / SUMMARY_FILE, directory / CONFIG_FILE
    if not (summary.is_file() and recorded.is_file()):
        return None
    try:
        same = (parse_run_config(load_config_file(recorded)) == config
                and first_difference(json.loads((directory / INPUTS_FILE).read_text()),
                                     inputs) is None)
        return json.loads(summary.read_text()) if same else None
    except (ValueError, OSError):  # a damaged or older run: run it again
        return None


def compare(config: RunConfig, methods: Sequence[str], seeds: Sequence[int], out: Path,
            target: float, run: Callable[[RunConfig], dict]) -> dict[str, Any]:
    """Run every (method, seed) with ``run``, seed by seed (every method's seed 0 first), and
    write the comparison files into ``out``.

    A (method, seed) whose directory already holds a finished run (summary.json) of exactly
    the same configuration and the same inputs (data and model content, hfedmoe.fingerprint)
    is read back instead of run again, so an interrupted comparison resumes at its first
    unfinished run; any other run there is moved aside and run again (hfedmoe.run_dir).
    """
    inputs = current_inputs(config)
    out.mkdir(parents=True, exist_ok=True)
    flat = config.to_flat()
    summaries: dict[str, list[dict]] = {method: [] for method in methods}
    for seed in seeds:  # seed-major: an interrupted comparison has every method's first seeds
        for method in methods:
            run_config = parse_run_config(flat, {"method": method, "seed": seed,
                                                 "out": str(out / method / f"seed-{seed}")})
            summaries[method].append(finished_run(run_config, inputs) or run(run_config))
    results = {method: summarise_method(summaries[method], target) for method in methods}
    comparison = {"target_accuracy": target, "seeds": list(seeds), "methods": results,
                  "config": {k: v for k, v in flat.items() if k not in ("method", "seed", "out")}}
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (out / "comparison.md").write_text(comparison_table(comparison))
    plot_comparison(comparison, out)
    return comparison
