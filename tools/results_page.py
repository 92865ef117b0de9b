"""Assemble docs/results.md from the comparisons written by tools/results.sh.

    python tools/results_page.py record DIR --command "hfedmoe compare ..." --wall-seconds S
        writes DIR/run.json: the exact command, its wall time and the machine it ran on
    python tools/results_page.py page ROOT [--out docs/results.md]
        one section per ROOT/<bench>-<alpha>[-r<rounds>]/comparison.json (+ run.json), in
        sorted order (a -r<rounds> folder: a longer setting, after the benchmark's own);
        --keep carries over the current page's sections that ROOT has no data for, marked
        as kept (a comparison re-run over several sittings keeps the page whole meanwhile);
        after them, a summary across the classification settings (SUMMARY_TITLE)

Every number on the page is formatted from comparison.json (mean ± std over seeds), never
recomputed from the runs. Personalised accuracy is shown when comparison.json has it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

BENCH_NAMES = {"bbc": "BBC News", "wordnet": "WordNet 3.0 lexnames",
               "instruct-qlora": "Instruction tuning SmolLM2-MoE on the quizzes, QLoRA clients",
               "instruct": "Instruction tuning SmolLM2-MoE on the quizzes"}
PERSONAL = "final_personal_accuracy"  # absent from comparisons made before it existed
CONFIG_SHOWN = ("model.name", "num-server-rounds", "data.source", "data.num-clients",
                "data.partition", "data.dirichlet-alpha", "data.max-examples",
                "data.test-fraction", "data.client-test-fraction", "budget.experts",
                "train.local-steps", "train.batch-size", "train.lr", "train.lr-schedule",
                "train.adapter", "lora.rank", "lora.targets", "model.quantization",
                "model.max-length", "simulation.runtime")
MIB = 2**20
SUMMARY_TITLE = "Summary across the settings"
# methods whose global model is not comparable with the others' (FLEx: a shared head over the
# frozen pretrained experts, trained beside each client's personal experts): left out of the
# summary's "best global model" columns, kept in its personalised one
NOT_GLOBAL = frozenset({"flex"})


def machine() -> dict[str, Any]:
    """CPU model and logical cores (from /proc/cpuinfo), memory (from /proc/meminfo)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
              if line.startswith("model name")]
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kib = next((int(line.split()[1]) for line in meminfo.splitlines()
                    if line.startswith("MemTotal:")), None)
    return {"cpu": models[0] if models else "unknown", "cores": len(models) or os.cpu_count(),
            "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None}


def record(directory: Path, command: str, wall_seconds: float, add_to_previous: bool = False
           ) -> dict[str, Any]:
    """Write ``directory/run.json`` describing how its comparison was produced.

    ``add_to_previous``: the comparison was extended (e.g. methods added; the finished runs
    were reused), so the wall time is the earlier run.json's plus ``wall_seconds``."""
    parts = 1
    previous = directory / "run.json"
    if add_to_previous and previous.exists():
        earlier = json.loads(previous.read_text())
        wall_seconds += earlier["wall_seconds"]
        parts = earlier.get("parts", 1) + 1
    info = {"command": command, "wall_seconds": wall_seconds, "parts": parts,
            "machine": machine(),
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    (directory / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# --- formatting ---------------------------------------------------------------------------

def cell(stats: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 3,
         missing: str = "never") -> str:
    """``mean ± std`` of a comparison.json statistic; ``(k/n seeds)`` if only k seeds have a
    value; ``missing`` if none has."""
    if stats is None or stats["mean"] is None:
        return missing
    values = stats.get("values", [])
    text = f"{stats['mean'] / scale:.{digits}f} ± {stats['std'] / scale:.{digits}f}"
    reached = sum(v is not None for v in values)
    return text if reached == len(values) else f"{text} ({reached}/{len(values)} seeds)"


def personal_stats(method: Mapping[str, Any]) -> Mapping[str, Any] | None:
    stats = method.get(PERSONAL)
    return stats if isinstance(stats, Mapping) else None


def method_table(comparison: Mapping[str, Any]) -> list[str]:
    methods = comparison["methods"]
    personal = any(personal_stats(m) is not None for m in methods.values())
    head = ["method", "final accuracy"] + (["personalised accuracy"] if personal else []) + [
        "best accuracy", f"rounds to {comparison['target_accuracy']}", "MiB uploaded",
        "budget respected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        row = [name, cell(m["final_accuracy"])]
        row += [cell(personal_stats(m), missing="n/a")] if personal else []
        row += [cell(m.get("best_accuracy"), missing="n/a")]  # the best round of each seed
        row += [cell(m["rounds_to_target"], digits=1), cell(m["bytes_up"], MIB, 1),
                "yes" if m["within_budget"] else "**no**"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def curve_table(comparison: Mapping[str, Any], columns: int = 4) -> list[str]:
    """Mean global test accuracy over seeds at ``columns`` evenly spaced rounds after round 0
    (the initial model), for a longer setting: where each method was when the benchmark's own
    rounds ended, and whether it still climbed or swung at the end. Rounds are 0-based
    indices of ``accuracy_by_round_mean`` (entry r: after round r). Where comparison.json has
    it (hfedmoe compare since 1 Dec 2026), a last column gives ``late_accuracy_change``: each
    seed's mean absolute round-to-round change over the second half, mean ± std over seeds
    (a swing the mean curve averages away)."""
    methods = comparison["methods"]
    curves = {name: m["accuracy_by_round_mean"] for name, m in methods.items()}
    last = min(len(curve) for curve in curves.values()) - 1  # rounds every seed ran
    shown = sorted({0, *(round(last * k / columns) for k in range(1, columns + 1))})
    swing = all("late_accuracy_change" in m for m in methods.values())
    head = ["method"] + [f"round {r}" for r in shown] + (
        [f"change per round, rounds {last // 2 + 1}-{last}"] if swing else [])
    caption = "Mean global test accuracy over seeds by round (round 0: the initial model)" + (
        "; last column: how much each seed still swings at the end, its mean absolute change "
        "of accuracy from one round to the next over the second half of the rounds (mean ± std "
        "over seeds)" if swing else "")
    lines = [caption + ":", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, curve in curves.items():
        row = [name] + [f"{curve[r]:.3f}" for r in shown]
        row += [cell(methods[name]["late_accuracy_change"], missing="n/a")] if swing else []
        lines.append("| " + " | ".join(row) + " |")
    return lines


def peaks_by_budget(clients: list[Mapping[str, Any]]) -> str:
    """``budget: peak GiB`` per distinct budget (the largest measured peak among the clients
    holding it), budgets ascending; "n/a" without measurements."""
    peaks: dict[int, float] = {}
    for client in clients:
        peak = client.get("peak_memory_bytes")
        if peak:
            budget = client["budget_experts"]
            peaks[budget] = max(peaks.get(budget, 0.0), peak)
    return ", ".join(f"{b}: {peaks[b] / 2**30:.2f}" for b in sorted(peaks)) or "n/a"


def lm_table(comparison: Mapping[str, Any]) -> list[str]:
    """Causal-LM comparisons: held-out perplexity, the greedy answers' exact match and ROUGE-L,
    next-token accuracy, upload, and the clients' measured peak memory per budget (the first
    seed's clients)."""
    head = ["method", "perplexity", "exact match", "ROUGE-L", "next-token accuracy",
            "MiB uploaded", "peak GiB by budget", "budget respected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in comparison["methods"].items():
        row = [name, cell(m.get("final_perplexity"), digits=2, missing="n/a"),
               cell(m.get("final_exact_match"), missing="n/a"),
               cell(m.get("final_rouge_l"), missing="n/a"), cell(m["final_accuracy"]),
               cell(m["bytes_up"], MIB, 1), peaks_by_budget(m.get("clients", [])),
               "yes" if m["within_budget"] else "**no**"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def setting(name: str) -> tuple[str, str, int | None]:
    """(bench, alpha, rounds) of a comparison folder named ``<bench>-<alpha>`` or, for a
    longer setting, ``<bench>-<alpha>-r<rounds>`` (tools/results.sh ROUNDS=...)."""
    match = re.fullmatch(r"(?P<bench>.+?)-(?P<alpha>[0-9.]+)(?:-r(?P<rounds>[0-9]+))?", name)
    if match is None:
        return name, "", None
    rounds = match["rounds"]
    return match["bench"], match["alpha"], int(rounds) if rounds else None


def is_language_model(comparison: Mapping[str, Any]) -> bool:
    return comparison.get("config", {}).get("task") == "causal-lm"


def title(name: str, comparison: Mapping[str, Any]) -> str:
    """The page section's title of the comparison in folder ``name``: the benchmark, its
    split, and the rounds of a longer setting."""
    bench, alpha, rounds = setting(name)
    config = comparison.get("config", {})
    alpha = config.get("data.dirichlet-alpha", alpha)
    if is_language_model(comparison) or config.get("data.partition", "dirichlet") != "dirichlet":
        text = f"{BENCH_NAMES.get(bench, bench)}, {config.get('data.partition', '?')} split"
    else:
        text = f"{BENCH_NAMES.get(bench, bench)}, Dirichlet α = {alpha}"
    if rounds is not None:
        text += f", longer: {config.get('num-server-rounds', rounds)} rounds"
    return text


def best(methods: Mapping[str, Mapping[str, Any]], statistic: str = "final_accuracy") -> str:
    """```name` mean ± std`` of the method with the highest mean ``statistic`` among
    ``methods`` (the first listed on a tie), "n/a" if none has it."""
    scored = [(m[statistic]["mean"], name) for name, m in methods.items()
              if isinstance(m.get(statistic), Mapping) and m[statistic]["mean"] is not None]
    if not scored:
        return "n/a"
    top = max(scored, key=lambda entry: entry[0])[1]  # max keeps the first of equal means
    return f"`{top}` {cell(methods[top][statistic], missing='n/a')}"


def summary_table(comparisons: list[tuple[str, Mapping[str, Any]]],
                  kept: Sequence[str] = ()) -> list[str]:
    """One row per classification comparison (``(folder name, comparison.json)``, in page
    order): HFedMoE's final global accuracy, the best global model among the methods that kept
    every client within its budget and among those that did not (FedAvg over all experts,
    FedAlign-MoE), and the best personalised accuracy; mean ± std over seeds as on the
    setting's own section. ``kept``: titles of sections kept from a previous page, which have
    no data here and are named below the table. Empty without a classification comparison."""
    rows = [(name, c) for name, c in comparisons if not is_language_model(c)]
    if not rows:
        return []
    head = ["setting", "`hfedmoe`", "best within the budgets", "best ignoring the budgets",
            "best personalised"]
    lines = [f"## {SUMMARY_TITLE}", "",
             "Final accuracy, mean ± std over seeds, from the sections above. \"Within the "
             "budgets\": every client of every seed kept its budget; "
             + " and ".join(f"`{name}`'s" for name in sorted(NOT_GLOBAL))
             + " global model is not comparable with the others' and is left out of the first "
             "three columns.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, comparison in rows:
        methods = comparison["methods"]
        comparable = {k: m for k, m in methods.items() if k not in NOT_GLOBAL}
        within = {k: m for k, m in comparable.items() if m.get("within_budget")}
        beyond = {k: m for k, m in comparable.items() if not m.get("within_budget")}
        hfedmoe = cell(methods["hfedmoe"]["final_accuracy"], missing="n/a") \
            if "hfedmoe" in methods else "n/a"
        lines.append("| " + " | ".join([title(name, comparison), hfedmoe, best(within),
                                         best(beyond), best(methods, PERSONAL)]) + " |")
    if kept:
        lines += ["", "Not in this table (kept from a previous page, no data under the results "
                  "folder): " + "; ".join(kept) + "."]
    return lines + [""]


def section(name: str, comparison: Mapping[str, Any], run: Mapping[str, Any] | None) -> list[str]:
    config = comparison.get("config", {})
    language_model = is_language_model(comparison)
    rounds = setting(name)[2]
    lines = [f"## {title(name, comparison)}", ""]
    if run:
        m = run["machine"]
        memory = f", {m['memory_gib']} GiB RAM" if m.get("memory_gib") else ""
        lines += [f"Command: `{run['command']}`", "",
                  f"Machine: {m['cpu']}, {m['cores']} cores{memory}. Wall time: "
                  f"{duration(run['wall_seconds'])}"
                  f"{' in %d parts' % run['parts'] if run.get('parts', 1) > 1 else ''} "
                  f"(finished {run['finished']}).", ""]
    else:
        total = sum(v or 0.0 for m in comparison["methods"].values()
                    for v in m["wall_seconds"]["values"])
        lines += [f"No run.json: command and machine unknown; runs took {duration(total)} "
                  "in total.", ""]
    if language_model:
        lines += [f"Seeds {', '.join(map(str, comparison['seeds']))}; mean ± std over seeds; "
                  "after the last round, on the global held-out pairs: perplexity of the "
                  "answer tokens, and greedy answers to a fixed sample of the prompts.", ""]
        lines += lm_table(comparison)
    else:
        lines += [f"Seeds {', '.join(map(str, comparison['seeds']))}; mean ± std over seeds; "
                  f"accuracy on the global test split after the last round.", ""]
        lines += method_table(comparison)
        if rounds is not None:
            lines += [""] + curve_table(comparison)
    lora = config.get("train.adapter") == "lora"
    shown = [f"`{k}` = {config[k]!r}" for k in CONFIG_SHOWN
             if k in config and (lora or not k.startswith(("lora.", "model.quantization")))
             and (k != "data.dirichlet-alpha" or config.get("data.partition") == "dirichlet")]
    return lines + ["", "Configuration: " + ", ".join(shown) + ".", ""]


def _order(path: Path) -> tuple[str, int, float, str]:
    """Comparison folders by bench, the benchmark's own rounds before longer settings, then
    milder skew (larger alpha) first."""
    bench, alpha, rounds = setting(path.parent.name)
    try:
        return bench, rounds or 0, -float(alpha), ""
    except ValueError:
        return path.parent.name, 0, 0.0, path.parent.name


TITLE = re.compile(r"(?P<name>.+?), Dirichlet α = (?P<alpha>[0-9.]+)"
                   r"(?:, longer: (?P<rounds>[0-9]+) rounds)?")
KEPT_NOTE = ("*Kept from the previous page: `tools/results_page.py page --keep` found no data "
             "for this section under the results folder.*")


def _title_order(heading: str) -> tuple[str, int, float, str]:
    """:func:`_order`'s key recovered from a section title (a section kept from the previous
    page has no folder); titles of another form sort by themselves."""
    match = TITLE.fullmatch(heading)
    if match is None:
        return heading, 0, 0.0, heading
    bench = {name: key for key, name in BENCH_NAMES.items()}.get(match["name"], match["name"])
    return bench, int(match["rounds"] or 0), -float(match["alpha"]), ""


def page_sections(text: str) -> dict[str, list[str]]:
    """Each "## " section of a page: its title -> its lines, title line included, up to the
    next "## " line."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:], [])
        if current is not None:
            current.append(line)
    return sections


def page(root: Path, notes: Path | None = None, previous: str | None = None) -> str:
    """The page: one section per comparison under ``root``, then ``notes`` (Markdown written
    by hand, e.g. docs/results_notes.md: what the figures mean, where a method loses).

    With ``previous`` (the current page's text), its generated sections that ``root`` has no
    comparison for are carried over unchanged but for a line saying so, in the same order as
    if generated (bench, the benchmark's own rounds first, milder skew first)."""
    found = sorted(root.glob("*/comparison.json"), key=_order)
    if not found:
        raise SystemExit(f"results_page: no */comparison.json under {root}")
    lines = ["# Results", "",
             "Generated by `tools/results_page.py` from the comparisons that `tools/results.sh` "
             "(`make results`) writes; do not edit by hand. Methods differ only in `method`: "
             "data, partitions, budgets, local steps and evaluation are identical for a seed. "
             "\"budget respected\": every client of every seed kept its active experts per batch "
             "within its budget. \"best accuracy\": each seed's best round (global test "
             "split), a measure of how far a method got before late-round swings. Wall times "
             "are of a shared or idle machine as stated; compare methods by accuracy and "
             "bytes, not by seconds.", ""]
    sections, comparisons = [], []
    for path in found:
        run_file = path.parent / "run.json"
        run = json.loads(run_file.read_text()) if run_file.exists() else None
        comparison = json.loads(path.read_text())
        comparisons.append((path.parent.name, comparison))
        sections.append((_order(path), section(path.parent.name, comparison, run)))
    notes_text = notes.read_text().rstrip() if notes is not None and notes.is_file() else ""
    kept = []
    if previous:  # the summary is never kept: it is remade from the data there is
        made = {block[0] for _, block in sections} | set(notes_text.splitlines())
        for heading, block in page_sections(previous).items():
            if "## " + heading not in made and heading != SUMMARY_TITLE:
                while block and not block[-1]:
                    block.pop()
                note = [] if KEPT_NOTE in block else [KEPT_NOTE, ""]
                order = _title_order(heading)
                sections.append((order, block[:2] + note + block[2:] + [""]))
                if TITLE.fullmatch(heading):  # a classification setting: one for the summary
                    kept.append((order, heading))
    for _, block in sorted(sections, key=lambda entry: entry[0]):
        lines += block
    lines += summary_table(comparisons, [heading for _, heading in sorted(kept)])
    if notes_text:  # the hand-written reading of the figures
        lines += ["", notes_text]
    return "\n".join(lines).rstrip() + "\n"


def missing_sections(current: Path, new_page: str) -> list[str]:
    """The generated ("## ...") section titles of the page at ``current`` (if any) that
    ``new_page`` lacks: a page made from a partial results folder would drop them (the notes'
    own titles come back with the notes)."""
    if not current.is_file():
        return []
    kept = set(new_page.splitlines())
    return [heading for heading in page_sections(current.read_text())
            if "## " + heading not in kept and heading != SUMMARY_TITLE]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="write DIR/run.json")
    rec.add_argument("directory", type=Path)
    rec.add_argument("--command", required=True, dest="cmd")
    rec.add_argument("--wall-seconds", type=float, required=True)
    rec.add_argument("--add-to-previous", action="store_true",
                     help="add the wall time to DIR/run.json's (an extended comparison)")
    pg = commands.add_parser("page", help="write the results page")
    pg.add_argument("root", type=Path)
    pg.add_argument("--out", type=Path, default=Path("docs/results.md"))
    pg.add_argument("--notes", type=Path, default=Path("docs/results_notes.md"),
                    help="hand-written Markdown appended to the page, if the file exists")
    pg.add_argument("--force", action="store_true",
                    help="write the page even if the current one has sections not in ROOT")
    pg.add_argument("--keep", action="store_true",
                    help="carry over the current page's sections that ROOT has no data for")
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.directory, args.cmd, args.wall_seconds, args.add_to_previous)
    else:
        previous = args.out.read_text() if args.keep and args.out.is_file() else None
        text = page(args.root, args.notes, previous)
        lost = missing_sections(args.out, text)
        if lost and not args.force:
            raise SystemExit(f"results_page: {args.out} has sections that {args.root} has no "
                             f"data for ({'; '.join(lost)}); not overwritten (--force replaces "
                             f"it anyway)")
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
