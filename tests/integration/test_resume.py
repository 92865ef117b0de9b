"""Kill the server process mid-run, resume it, and get the uninterrupted run's model and metrics.

The run is a real `hfedmoe run` process (ServerApp + ClientApp in-process runtime) killed with
SIGKILL - no clean-up code runs - after its second checkpoint is committed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hfedmoe import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
HFEDMOE = Path(sys.executable).parent / "hfedmoe"
ROUNDS = 5
ARGS = ["--config", "conf/tiny.toml", "--set", f"num-server-rounds={ROUNDS}",
        "--set", "train.local-steps=8", "--set", "checkpoint.keep=10"]
COMPARED = ("round", "accuracy", "loss", "train_loss", "bytes_up", "bytes_down")


def _metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in COMPARED} for line in lines if line.strip()]


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_latest(out / ckpt.CHECKPOINT_DIR).global_state


def _kill_after_checkpoint(out: Path, server_round: int, timeout: float) -> int:
    """Start a run, SIGKILL its process group once checkpoint ``server_round`` is committed;
    returns the newest committed round at the kill."""
    process = subprocess.Popen([str(HFEDMOE), "run", *ARGS, "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    marker = out / ckpt.CHECKPOINT_DIR / f"round-{server_round:06d}" / ckpt.COMMIT_FILE
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"no checkpoint {server_round} in {timeout} s"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    return ckpt.load_latest(out / ckpt.CHECKPOINT_DIR).server_round


@pytest.mark.slow
def test_killed_server_resumes_to_the_uninterrupted_result(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run = subprocess.run([str(HFEDMOE), "run", *ARGS, "--out", str(whole)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    committed = _kill_after_checkpoint(broken, 2, timeout=600)
    assert 2 <= committed < ROUNDS  # killed mid-run, after round 2's checkpoint
    assert not (broken / "summary.json").exists()

    resumed = subprocess.run([str(HFEDMOE), "run", "--resume", str(broken)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"round {committed + 1}/{ROUNDS}" in resumed.stdout
    assert "round 1/" not in resumed.stdout  # completed rounds are not run again

    assert _metrics(broken) == _metrics(whole)  # rounds 0..5, each exactly once
    final, expected = _final_state(broken), _final_state(whole)
    assert final.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-6, atol=1e-7)
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS
    assert summary["accuracy_by_round"] == json.loads(
        (whole / "summary.json").read_text())["accuracy_by_round"]


def test_resume_refuses_a_directory_without_checkpoints_and_a_changed_config(tmp_path):
    run = subprocess.run([str(HFEDMOE), "run", "--resume", str(tmp_path / "none")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "config.toml" in run.stderr
    out = tmp_path / "one"
    first = subprocess.run([str(HFEDMOE), "run", "--config", "conf/tiny.toml", "--set",
                            "num-server-rounds=1", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    changed = subprocess.run([str(HFEDMOE), "run", "--resume", str(out), "--set", "train.lr=0.1"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2
    assert "'train.lr' = 0.1 differs from the checkpoint's 0.003" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
