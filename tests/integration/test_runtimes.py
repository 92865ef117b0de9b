"""The same ServerApp/ClientApp through Flower's Ray simulation runtime, through `flwr run`
against a real SuperLink in simulation mode, and through the `hfedmoe` command line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hfedmoe.config import load_config_file, parse_run_config
from hfedmoe.report import read_metrics
from hfedmoe.runner import run_experiment

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(tmp_path):
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(tmp_path / "flwr_home"), "PATH": f"{BIN}:{env['PATH']}"})
    return env


@pytest.mark.slow
def test_ray_simulation_runtime_matches_inprocess(tmp_path):
    base = load_config_file(ROOT / "conf/tiny.toml")
    # half of 6 clients sampled for training and for evaluation: Ray gives its nodes random
    # ids, the in-process runtime 1..N; the sample is drawn over client ids, so it is the same
    sampled = {"data.num-clients": 6, "train.fraction-train": 0.5,
               "train.fraction-evaluate": 0.5}
    ray = run_experiment(parse_run_config(base, sampled, {"simulation.runtime": "ray",
                                                          "out": str(tmp_path / "ray")}))
    local = run_experiment(parse_run_config(base, sampled, {"simulation.runtime": "inprocess",
                                                            "out": str(tmp_path / "local")}))
    assert ray["rounds"] == 2

    def who(out):
        return [([c["client_id"] for c in r["clients"]], [p["client_id"] for p in r["personal"]])
                for r in read_metrics(out) if r["round"] > 0]

    assert who(tmp_path / "ray") == who(tmp_path / "local")
    assert all(len(trained) == 3 for trained, _ in who(tmp_path / "ray"))
    # same seeds, same partitions, same arithmetic: the runtime does not change the result
    assert ray["accuracy_by_round"] == pytest.approx(local["accuracy_by_round"], abs=1e-6)
    assert ray["personal_accuracy_by_round"][1:] == pytest.approx(
        local["personal_accuracy_by_round"][1:], abs=1e-6)  # clients' evaluate handler, on Ray
    assert ray["bytes_up"] == local["bytes_up"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@pytest.mark.slow
def test_flwr_run_against_a_simulation_superlink(tmp_path):
    env = _env(tmp_path)
    http, control, fleet, health = (_free_port() for _ in range(4))
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{http}"\n'
        "insecure = true\n")
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(http), "--control-api-address",
         f"127.0.0.1:{control}", "--fleet-api-address", f"127.0.0.1:{fleet}",
         "--health-server-address", f"127.0.0.1:{health}"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        _wait_for_port(http, 60)
        out = tmp_path / "out"
        overrides = (f'model.name="tiny:qwen2_moe" num-server-rounds=2 data.num-clients=3 '
                     f'train.local-steps=2 model.max-length=64 simulation.client-cpus=1 '
                     f'out="{out}"')
        run = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "sim", "--federation-config", "num-supernodes=3",
             "--run-config", overrides, "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and len(summary["clients"]) == 3
        assert summary["method"] == "hfedmoe"
    finally:
        os.killpg(superlink.pid, signal.SIGTERM)
        try:
            superlink.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(superlink.pid, signal.SIGKILL)
            superlink.wait(timeout=30)


def test_cli_help_explains_every_option():
    result = subprocess.run([str(BIN / "hfedmoe"), "run", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--config", "--set", "--out", "--verbose"):
        assert option in result.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--set", "data.dirichlet-alpha=0"], "data.dirichlet-alpha"),
    (["--set", "num-server-round=2"], "did you mean 'num-server-rounds'"),
    (["--config", "missing.toml"], "does not exist"),
    (["--set", "model.name=tiny:gpt2", "--set", "simulation.runtime=inprocess"], "gpt2"),
    (["--set", "data.source=file", "--set", "data.path=/nonexistent/x.jsonl",
      "--set", "simulation.runtime=inprocess"], "x.jsonl"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, fragment):
    result = subprocess.run([str(BIN / "hfedmoe"), "run", *args, "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run([str(BIN / "hfedmoe"), "run", "--config", "conf/tiny.toml",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 2/2 done" in result.stdout and "final accuracy" in result.stdout
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
