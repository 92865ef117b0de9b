"""tools/results.sh end to end on the tiny config: compare, record, page, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_results_script_writes_page_and_resumes(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "BENCHES": "tiny", "CONF_DIR": "conf", "ALPHAS": "0.5",
           "METHODS": "fedavg", "SEEDS": "1", "OUT": str(out), "PAGE": str(tmp_path / "r.md"),
           "LM_BENCHES": "tiny-lm", "LM_METHODS": "hfedmoe",
           "PYTHON": sys.executable, "HFEDMOE": str(Path(sys.executable).parent / "hfedmoe")}
    script = [str(ROOT / "tools" / "results.sh"), "--set", "num-server-rounds=1"]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    comparison = json.loads((out / "tiny-0.5" / "comparison.json").read_text())
    run = json.loads((out / "tiny-0.5" / "run.json").read_text())
    assert run["command"] == ("hfedmoe compare --methods fedavg --seeds 1 --target 0.9 --config "
                              f"conf/tiny.toml --set data.dirichlet-alpha=0.5 --out {out}/tiny-0.5 "
                              "--set num-server-rounds=1")
    assert comparison["config"]["num-server-rounds"] == 1
    assert comparison["config"]["data.dirichlet-alpha"] == 0.5
    page = (tmp_path / "r.md").read_text()
    accuracy = comparison["methods"]["fedavg"]["final_accuracy"]["values"][0]
    assert f"| fedavg | {accuracy:.3f} ± 0.000 |" in page
    # the causal-LM benchmark: its own section, with the perplexity table
    lm = json.loads((out / "tiny-lm" / "comparison.json").read_text())
    perplexity = lm["methods"]["hfedmoe"]["final_perplexity"]["values"][0]
    assert f"| hfedmoe | {perplexity:.2f} ± 0.00 |" in page
    assert json.loads((out / "tiny-lm" / "run.json").read_text())["command"].startswith(
        "hfedmoe compare --methods hfedmoe --seeds 1 --target 0.44 --config conf/tiny-lm.toml")
    before = (out / "tiny-0.5" / "comparison.json").stat().st_mtime_ns
    again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("is done") == 2
    assert (out / "tiny-0.5" / "comparison.json").stat().st_mtime_ns == before
    # TARGET re-summarises the finished runs (FORCE=1 re-enters, nothing is re-run)
    env_target = {**env, "FORCE": "1", "TARGET": "0.0", "LM_BENCHES": ""}
    target = subprocess.run(script, env=env_target, capture_output=True, text=True, timeout=120)
    assert target.returncode == 0, target.stdout[-2000:] + target.stderr[-2000:]
    retargeted = json.loads((out / "tiny-0.5" / "comparison.json").read_text())
    assert retargeted["target_accuracy"] == 0.0
    assert retargeted["methods"]["fedavg"]["rounds_to_target"]["values"] == [0]
    assert retargeted["methods"]["fedavg"]["final_accuracy"] == comparison["methods"]["fedavg"][
        "final_accuracy"]
    assert "round 1/1 started" in done.stdout + done.stderr  # the first call ran them
    assert "round 1/1 started" not in target.stdout + target.stderr  # reused, not re-run
