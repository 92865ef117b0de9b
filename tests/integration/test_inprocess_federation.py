"""Whole federations in-process: the real ServerApp/ClientApp/strategy on tiny random MoEs."""

import json

import pytest

from hfedmoe.config import load_config_file, parse_run_config
from hfedmoe.report import read_metrics
from hfedmoe.runner import run_experiment

TINY = "conf/tiny.toml"


def _config(tmp_path, **overrides):
    flat = {"out": str(tmp_path / "run"), "method": "fedavg", "budget.experts": "all",
            **overrides}
    return parse_run_config(load_config_file(TINY), flat)


def test_fedavg_learns_and_writes_every_output(tmp_path):
    config = _config(tmp_path, **{"num-server-rounds": 3})
    summary = run_experiment(config)
    out = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "accuracy.png", "loss.png"):
        assert (out / name).is_file(), name
    rounds = read_metrics(out)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    # learning, measured on the held-out test split against the initial model
    assert rounds[-1]["loss"] < rounds[0]["loss"]
    assert summary["best_accuracy"] > rounds[0]["accuracy"]
    # nothing lost: every sampled client replied, every round
    assert all(len(r["clients"]) == 3 and not r["failures"] for r in rounds[1:])
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["method"] == "fedavg" and summary["rounds"] == 3
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rounds) > 0
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in rounds) > 0
    assert [c["client_id"] for c in summary["clients"]] == [0, 1, 2]
    total_experts = 2 * 8  # tiny:qwen2_moe: 2 MoE layers x 8 experts
    for client in summary["clients"]:
        assert client["budget_experts"] == total_experts
        assert 0 < client["max_active_experts_per_batch"] <= client["budget_experts"]
        assert client["peak_memory_bytes"] > 0 and client["num_examples"] > 0
    sizes = sum(c["num_examples"] for c in summary["clients"])
    tested = sum(e["num_examples"] for e in rounds[-1]["personal"])  # clients' own test splits
    assert sizes + tested == 1701  # the whole BBC train split, partitioned without loss


@pytest.mark.parametrize("family", ["switch_transformers", "deepseek_v3"])
def test_other_families_run_a_round(tmp_path, family):
    config = _config(tmp_path, **{"model.name": f"tiny:{family}", "num-server-rounds": 1,
                                  "train.local-steps": 2})
    summary = run_experiment(config)
    assert summary["rounds"] == 1 and len(summary["clients"]) == 3


def test_fraction_train_samples_a_subset_deterministically(tmp_path):
    config = _config(tmp_path, **{"num-server-rounds": 2, "train.fraction-train": 0.5,
                                  "train.local-steps": 1})
    run_experiment(config)
    first = [[c["client_id"] for c in r["clients"]] for r in read_metrics(tmp_path / "run")]
    config2 = _config(tmp_path, **{"num-server-rounds": 2, "train.fraction-train": 0.5,
                                   "train.local-steps": 1, "out": str(tmp_path / "run2")})
    run_experiment(config2)
    second = [[c["client_id"] for c in r["clients"]] for r in read_metrics(tmp_path / "run2")]
    assert first == second and all(len(ids) == 2 for ids in first[1:])


def test_a_failing_client_is_recorded_and_the_round_goes_on(tmp_path):
    from flwr.clientapp import ClientApp

    from hfedmoe.federation.client_app import make_client_app
    from hfedmoe.federation.grids import InProcessGrid
    from hfedmoe.federation.server_app import run_server

    real = make_client_app()
    flaky = ClientApp()

    @flaky.train()
    def train(msg, context):
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("injected failure")
        return real(msg, context)

    config = _config(tmp_path, **{"num-server-rounds": 2, "train.local-steps": 1})
    summary = run_server(InProcessGrid(flaky, 3), config)
    rounds = read_metrics(tmp_path / "run")
    assert summary["rounds"] == 2
    for record in rounds[1:]:
        assert [c["client_id"] for c in record["clients"]] == [0, 2]
        assert len(record["failures"]) == 1 and "injected failure" in record["failures"][0]["reason"]
