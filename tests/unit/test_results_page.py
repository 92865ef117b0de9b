"""tools/results_page.py: the results page's tables are the comparison.json numbers.

The fixture tests/fixtures/results/tiny-0.5 is the output of
``METHODS=hfedmoe,fedavg SEEDS=2 BENCHES=tiny CONF_DIR=conf ALPHAS=0.5 tools/results.sh``.
Expected cells are recomputed here from each statistic's per-seed ``values``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "results"
MIB = 2**20


@pytest.fixture(scope="module")
def tool():
    path = ROOT / "tools" / "results_page.py"
    spec = importlib.util.spec_from_file_location("results_page", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tables(page: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of ``page`` as rows of {header: cell}."""
    found, lines = [], page.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            head = [c.strip() for c in lines[i - 1].strip("|").split("|")]
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(head, (c.strip() for c in row.strip("|").split("|")))))
            found.append(rows)
    return found


def expected(values: list, scale: float = 1.0, digits: int = 3) -> str:
    present = [v / scale for v in values if v is not None]
    if not present:
        return "never"
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    text = f"{statistics.fmean(present):.{digits}f} ± {std:.{digits}f}"
    return text if len(present) == len(values) else f"{text} ({len(present)}/{len(values)} seeds)"


def copy_fixture(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "results")
    return tmp_path / "results"


def test_table_matches_comparison_json(tool):
    comparison = json.loads((FIXTURE / "tiny-0.5" / "comparison.json").read_text())
    page = tool.page(FIXTURE)
    rows, _summary = tables(page)
    assert [r["method"] for r in rows] == list(comparison["methods"]) == ["hfedmoe", "fedavg"]
    for row in rows:
        m = comparison["methods"][row["method"]]
        assert row["final accuracy"] == expected(m["final_accuracy"]["values"])
        assert row["personalised accuracy"] == expected(m["final_personal_accuracy"]["values"])
        assert row["best accuracy"] == expected(m["best_accuracy"]["values"])
        assert row["rounds to 0.9"] == expected(m["rounds_to_target"]["values"], digits=1)
        assert row["MiB uploaded"] == expected(m["bytes_up"]["values"], 2**20, 1)
        assert row["budget respected"] == ("yes" if m["within_budget"] else "**no**")
    run = json.loads((FIXTURE / "tiny-0.5" / "run.json").read_text())
    assert f"Command: `{run['command']}`" in page
    assert f"Machine: {run['machine']['cpu']}, {run['machine']['cores']} cores" in page
    assert "Wall time: 2 min" in page  # 110 s
    assert "`data.dirichlet-alpha` = 0.5" in page and "Seeds 0, 1;" in page


def test_absent_personal_accuracy_drops_the_column_and_partial_targets_say_so(tool, tmp_path):
    root = copy_fixture(tmp_path)
    path = root / "tiny-0.5" / "comparison.json"
    comparison = json.loads(path.read_text())
    for m in comparison["methods"].values():
        del m["final_personal_accuracy"]
    comparison["methods"]["hfedmoe"]["rounds_to_target"] = {"mean": 2.0, "std": 0.0,
                                                            "values": [2, None]}
    path.write_text(json.dumps(comparison))
    (root / "tiny-0.5" / "run.json").unlink()
    page = tool.page(root)
    rows, _summary = tables(page)
    assert list(rows[0]) == ["method", "final accuracy", "best accuracy", "rounds to 0.9",
                             "MiB uploaded", "budget respected"]
    assert rows[0]["rounds to 0.9"] == "2.0 ± 0.0 (1/2 seeds)"
    assert rows[1]["rounds to 0.9"] == "never"
    total = sum(v for m in comparison["methods"].values() for v in m["wall_seconds"]["values"])
    assert f"No run.json: command and machine unknown; runs took {round(total / 60)} min" in page


def test_record_describes_this_machine(tool, tmp_path):
    info = tool.record(tmp_path, "hfedmoe compare --x", 3725.0)
    assert json.loads((tmp_path / "run.json").read_text()) == info
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    assert info["machine"]["cores"] == sum(line.startswith("model name") for line in cpuinfo)
    assert tool.duration(3725.0) == "1 h 02 min" and tool.duration(110.0) == "2 min"


def test_an_extended_comparison_adds_its_wall_time_to_the_earlier_one(tool, tmp_path):
    tool.record(tmp_path, "hfedmoe compare --methods a,b", 600.0)
    info = tool.record(tmp_path, "hfedmoe compare --methods a,b,c", 300.0, add_to_previous=True)
    assert (info["wall_seconds"], info["parts"]) == (900.0, 2)
    assert info["command"] == "hfedmoe compare --methods a,b,c"
    assert tool.record(tmp_path, "again", 60.0)["wall_seconds"] == 60.0  # a fresh record
    comparison = {"target_accuracy": 0.9, "seeds": [0], "config": {}, "methods": {}}
    assert "Wall time: 15 min in 2 parts" in "\n".join(tool.section("bbc-0.5", comparison, info))


def test_no_comparison_is_an_error(tool, tmp_path):
    with pytest.raises(SystemExit, match="no \\*/comparison.json"):
        tool.page(tmp_path)


def test_a_longer_setting_gets_its_own_section_after_the_benchmarks_own(tool, tmp_path):
    root = copy_fixture(tmp_path)
    comparison = json.loads((root / "tiny-0.5" / "comparison.json").read_text())
    for name, rounds in (("tiny-0.1-r20", 20), ("tiny-0.1", None)):
        config = {**comparison["config"], "data.dirichlet-alpha": 0.1}
        if rounds:
            config["num-server-rounds"] = rounds
        (root / name).mkdir()
        (root / name / "comparison.json").write_text(json.dumps({**comparison, "config": config}))
    titles = [line for line in tool.page(root).splitlines() if line.startswith("## ")]
    assert titles == ["## tiny, Dirichlet α = 0.5", "## tiny, Dirichlet α = 0.1",
                      "## tiny, Dirichlet α = 0.1, longer: 20 rounds",
                      "## " + tool.SUMMARY_TITLE]
    assert tool.setting("wordnet-0.1-r20") == ("wordnet", "0.1", 20)
    assert tool.setting("bbc-0.5") == ("bbc", "0.5", None)


def test_a_longer_setting_shows_each_methods_mean_curve_at_evenly_spaced_rounds(tool):
    curve = [0.1 + 0.01 * r for r in range(21)]  # 20 rounds
    comparison = {"methods": {"a": {"accuracy_by_round_mean": curve},
                              "b": {"accuracy_by_round_mean": curve[::-1]}}}
    rows = tables("\n".join(tool.curve_table(comparison)))[0]
    assert list(rows[0]) == ["method"] + [f"round {r}" for r in (0, 5, 10, 15, 20)]
    assert [row["round 5"] for row in rows] == ["0.150", "0.250"]
    assert rows[1]["round 20"] == "0.100"
    assert len(rows[0]) == 6  # no swing column without late_accuracy_change
    for name, values in (("a", [0.01, 0.03]), ("b", [0.1, 0.2])):
        comparison["methods"][name]["late_accuracy_change"] = {
            "mean": statistics.fmean(values), "std": statistics.stdev(values), "values": values}
    rows = tables("\n".join(tool.curve_table(comparison)))[0]
    assert [row["change per round, rounds 11-20"] for row in rows] == \
        ["0.020 ± 0.014", "0.150 ± 0.071"]
    # a page section of a longer setting carries it, the benchmark's own does not
    fixture = json.loads((FIXTURE / "tiny-0.5" / "comparison.json").read_text())
    longer = tool.section("tiny-0.5-r2", fixture, None)
    assert "| method | round 0 | round 1 | round 2 |" in longer
    hfedmoe = fixture["methods"]["hfedmoe"]["accuracy_by_round_mean"]
    assert f"| hfedmoe | {hfedmoe[0]:.3f} | {hfedmoe[1]:.3f} | {hfedmoe[2]:.3f} |" in longer
    assert not any(line.startswith("| method | round") for line in
                   tool.section("tiny-0.5", fixture, None))


def test_a_language_model_comparison_gets_the_lm_table(tool, tmp_path):
    """Causal-LM comparisons: perplexity, exact match, ROUGE-L, next-token accuracy and the
    clients' peak memory per budget, each from comparison.json."""
    def stats(*values):
        mean = statistics.fmean(values)
        return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": list(values)}

    clients = [{"client_id": 0, "budget_experts": 30, "peak_memory_bytes": 0.75 * 2**30},
               {"client_id": 1, "budget_experts": 120, "peak_memory_bytes": 1.0 * 2**30},
               {"client_id": 2, "budget_experts": 30, "peak_memory_bytes": 0.8 * 2**30}]
    method = {"final_accuracy": stats(0.43, 0.44), "final_perplexity": stats(31.0, 33.0),
              "final_exact_match": stats(0.0, 0.0625), "final_rouge_l": stats(0.03, 0.05),
              "bytes_up": stats(200 * MIB, 210 * MIB), "within_budget": True,
              "rounds_to_target": stats(1, 1), "wall_seconds": stats(100.0, 110.0),
              "clients": clients}
    comparison = {"target_accuracy": 0.4, "seeds": [0, 1], "methods": {"hfedmoe": method},
                  "config": {"task": "causal-lm", "data.partition": "natural",
                             "train.adapter": "lora", "lora.rank": 8}}
    (tmp_path / "instruct-qlora").mkdir()
    (tmp_path / "instruct-qlora" / "comparison.json").write_text(json.dumps(comparison))
    page = tool.page(tmp_path)
    assert "## Instruction tuning SmolLM2-MoE on the quizzes, QLoRA clients, natural split" in page
    [[row]] = tables(page)
    assert row == {"method": "hfedmoe", "perplexity": "32.00 ± 1.41",
                   "exact match": expected([0.0, 0.0625]), "ROUGE-L": expected([0.03, 0.05]),
                   "next-token accuracy": expected([0.43, 0.44]), "MiB uploaded": "205.0 ± 7.1",
                   "peak GiB by budget": "30: 0.80, 120: 1.00", "budget respected": "yes"}
    assert "`lora.rank` = 8" in page


def test_a_page_from_partial_results_does_not_overwrite_sections_it_lacks(tool, tmp_path):
    root = copy_fixture(tmp_path)
    out = tmp_path / "results.md"
    notes = tmp_path / "notes.md"
    notes.write_text("## Reading the figures\n\nhand-written\n")
    tool.main(["page", str(root), "--out", str(out), "--notes", str(notes)])
    full = out.read_text()
    tool.main(["page", str(root), "--out", str(out), "--notes", str(notes)])  # same: fine
    comparison = json.loads((root / "tiny-0.5" / "comparison.json").read_text())
    comparison["config"]["data.dirichlet-alpha"] = 0.1
    (root / "tiny-0.1").mkdir()
    (root / "tiny-0.1" / "comparison.json").write_text(json.dumps(comparison))
    shutil.rmtree(root / "tiny-0.5")  # the folder now lacks the page's tiny-0.5 section
    with pytest.raises(SystemExit, match="tiny, Dirichlet α = 0.5"):
        tool.main(["page", str(root), "--out", str(out), "--notes", str(notes)])
    assert out.read_text() == full  # untouched
    tool.main(["page", str(root), "--out", str(out), "--notes", str(notes), "--force"])
    assert "## tiny, Dirichlet α = 0.5" not in out.read_text()


def test_keep_carries_over_the_sections_the_folder_lacks_in_page_order(tool, tmp_path):
    root = copy_fixture(tmp_path)
    out, notes = tmp_path / "results.md", tmp_path / "notes.md"
    notes.write_text("## Reading the figures\n\nhand-written\n")
    comparison = json.loads((root / "tiny-0.5" / "comparison.json").read_text())
    for name, alpha, rounds in (("tiny-0.1", 0.1, None), ("tiny-0.1-r20", 0.1, 20)):
        config = {**comparison["config"], "data.dirichlet-alpha": alpha}
        if rounds:
            config["num-server-rounds"] = rounds
        (root / name).mkdir()
        (root / name / "comparison.json").write_text(json.dumps({**comparison,
                                                                 "config": config}))
    tool.main(["page", str(root), "--out", str(out), "--notes", str(notes)])
    full = out.read_text()
    sections = tool.page_sections(full)
    # a later sitting re-ran only the longer setting, with new numbers
    shutil.rmtree(root / "tiny-0.5")
    shutil.rmtree(root / "tiny-0.1")
    comparison["methods"]["hfedmoe"]["final_accuracy"]["mean"] = 0.123456
    (root / "tiny-0.1-r20" / "comparison.json").write_text(json.dumps(
        {**comparison, "config": {**comparison["config"], "data.dirichlet-alpha": 0.1,
                                  "num-server-rounds": 20}}))
    tool.main(["page", str(root), "--out", str(out), "--notes", str(notes), "--keep"])
    kept = out.read_text()
    titles = [line for line in kept.splitlines() if line.startswith("## ")]
    assert titles == ["## tiny, Dirichlet α = 0.5", "## tiny, Dirichlet α = 0.1",
                      "## tiny, Dirichlet α = 0.1, longer: 20 rounds",
                      "## " + tool.SUMMARY_TITLE, "## Reading the figures"]
    now = tool.page_sections(kept)
    for title in ("tiny, Dirichlet α = 0.5", "tiny, Dirichlet α = 0.1"):  # kept as they were
        assert [line for line in now[title] if line] == \
            [sections[title][0], tool.KEPT_NOTE] + [line for line in sections[title][1:] if line]
    assert "0.123 ±" in "\n".join(now["tiny, Dirichlet α = 0.1, longer: 20 rounds"])
    assert "0.123 ±" not in "\n".join(now["tiny, Dirichlet α = 0.1"])
    assert kept.count("hand-written") == 1
    tool.main(["page", str(root), "--out", str(out), "--notes", str(notes), "--keep"])
    assert out.read_text() == kept  # kept twice: still one note per section


def test_the_summary_names_the_best_method_within_and_beyond_the_budgets(tool):
    """One row per classification setting, in page order; each "best" cell is the method with
    the highest mean over its own group (flex's global model left out), recomputed here from
    the per-seed values."""
    def stats(*values):
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values),
                "values": list(values)}

    def method(final, personal, within):
        return {"final_accuracy": stats(*final), tool.PERSONAL: stats(*personal),
                "within_budget": within}

    first = {"config": {"data.dirichlet-alpha": 0.5}, "methods": {
        "hfedmoe": method((0.80, 0.84), (0.70, 0.72), True),
        "fedmoe": method((0.83, 0.85), (0.60, 0.62), True),  # best within: mean 0.84
        "fedavg-full": method((0.90, 0.92), (0.80, 0.86), False),
        "fedalign": method((0.89, 0.91), (0.81, 0.87), False),  # personal best: 0.84
        "flex": method((0.95, 0.97), (0.50, 0.52), True)}}  # highest global: not comparable
    second = {"config": {"data.dirichlet-alpha": 0.1, "num-server-rounds": 20}, "methods": {
        "hfedmoe": method((0.5, 0.7), (0.5, 0.5), True),  # best within, 0.6
        "fedavg-full": method((0.5, 0.6), (0.4, 0.4), False),
        "flex": method((0.1, 0.1), (0.9, 0.7), True)}}  # personal best, 0.8
    lm = {"config": {"task": "causal-lm"}, "methods": {"hfedmoe": method((0.4, 0.4), (0, 0),
                                                                              True)}}
    lines = tool.summary_table([("bbc-0.5", first), ("instruct", lm), ("bbc-0.1-r20", second)],
                               kept=["WordNet 3.0 lexnames, Dirichlet α = 0.5"])
    rows = tables("\n".join(lines))[0]
    assert [row["setting"] for row in rows] == ["BBC News, Dirichlet α = 0.5",
                                                "BBC News, Dirichlet α = 0.1, longer: 20 rounds"]
    assert rows[0] == {"setting": "BBC News, Dirichlet α = 0.5",
                       "`hfedmoe`": expected([0.80, 0.84]),
                       "best within the budgets": "`fedmoe` " + expected([0.83, 0.85]),
                       "best ignoring the budgets": "`fedavg-full` " + expected([0.90, 0.92]),
                       "best personalised": "`fedalign` " + expected([0.81, 0.87])}
    assert rows[1]["best within the budgets"] == "`hfedmoe` " + expected([0.5, 0.7])
    assert rows[1]["best personalised"] == "`flex` " + expected([0.9, 0.7])
    assert lines[-2].endswith(": WordNet 3.0 lexnames, Dirichlet α = 0.5.")
    assert tool.summary_table([("instruct", lm)]) == []


def test_the_page_remakes_its_summary_after_the_settings_and_never_keeps_an_old_one(tool,
                                                                                    tmp_path):
    root = copy_fixture(tmp_path)
    out, notes = tmp_path / "results.md", tmp_path / "notes.md"
    notes.write_text("## Reading the figures\n\nhand-written\n")
    tool.main(["page", str(root), "--out", str(out), "--notes", str(notes)])
    page = out.read_text()
    titles = [line for line in page.splitlines() if line.startswith("## ")]
    assert titles == ["## tiny, Dirichlet α = 0.5", "## " + tool.SUMMARY_TITLE,
                      "## Reading the figures"]
    comparison = json.loads((root / "tiny-0.5" / "comparison.json").read_text())
    [summary] = [t for t in tables(page) if "setting" in t[0]]
    assert summary[0]["`hfedmoe`"] == expected(
        comparison["methods"]["hfedmoe"]["final_accuracy"]["values"])
    # the setting moves to α = 0.1: the old α = 0.5 section is kept, the summary is not
    comparison["config"]["data.dirichlet-alpha"] = 0.1
    (root / "tiny-0.1").mkdir()
    (root / "tiny-0.1" / "comparison.json").write_text(json.dumps(comparison))
    shutil.rmtree(root / "tiny-0.5")
    tool.main(["page", str(root), "--out", str(out), "--notes", str(notes), "--keep"])
    kept = out.read_text()
    assert kept.count("## " + tool.SUMMARY_TITLE) == 1
    [summary] = [t for t in tables(kept) if "setting" in t[0]]
    assert [row["setting"] for row in summary] == ["tiny, Dirichlet α = 0.1"]
    assert "folder): tiny, Dirichlet α = 0.5." in kept
    assert tool.KEPT_NOTE not in "\n".join(tool.page_sections(kept)[tool.SUMMARY_TITLE])
