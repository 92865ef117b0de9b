"""A run's directory and its outcome: earlier runs are never destroyed, a resume refuses
changed inputs, and a run that learned nothing does not report success (in-process, through
the command line's ``main``)."""

import json
from pathlib import Path

from hfedmoe.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "conf/tiny.toml", "--set", "num-server-rounds=1",
        "--set", "train.local-steps=1"]


def test_a_new_run_moves_an_earlier_run_aside(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["run", *TINY, "--set", "seed=1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"moved the earlier run in {out} to {out}.1" in printed
    kept = {p.name: p.read_bytes() for p in (tmp_path / "run.1").iterdir() if p.is_file()}
    assert kept == first  # every file of the first run, unchanged
    assert (tmp_path / "run.1" / "checkpoints").is_dir()
    assert "seed = 1" in (out / "config.toml").read_text()
    assert main(["run", *TINY, "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.1", "run.2"]


def test_a_run_that_learned_nothing_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    status = main(["run", *TINY, "--set", "num-server-rounds=2",
                   "--set", "federation.max-update-norm=1e-12", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 1 and err[0].startswith("hfedmoe: error: no round of 2 aggregated"), err
    assert "6 x rejected reply" in err[0]  # 3 clients x 2 rounds, each rejected
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["trained_rounds"] == 0 and summary["rounds"] == 2
    assert main(["run", *TINY, "--out", str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["trained_rounds"] == 1


def test_resume_refuses_a_run_whose_data_changed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data.jsonl"
    rows = [{"text": f"shares and profit item {i}" if i % 2 else f"the team won game {i}",
             "label": i % 2} for i in range(30)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = [*TINY, "--set", "data.source=file", "--set", f"data.path={data}",
            "--set", "data.num-clients=2", "--set", "data.min-partition-size=1"]
    assert main(["run", *args, "--out", str(out)]) == 0
    assert main(["run", "--resume", str(out), "--set", "num-server-rounds=2"]) == 0
    rows[3]["text"] = "an edited row"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--set", "num-server-rounds=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the data changed" in err[0], err
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2  # left as it was
