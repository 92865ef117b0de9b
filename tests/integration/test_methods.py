"""Every method runs two rounds on a tiny MoE in-process, with identical partitions, and behaves
as its definition says (budgets, uploads, aggregation switches)."""

import pytest
import torch

from hfedmoe.aggregation import ClientUpdate
from hfedmoe.config import METHODS, SPLIT_METHODS, load_config_file, parse_run_config
from hfedmoe.report import read_metrics
from hfedmoe.runner import run_experiment
from hfedmoe.strategies import method_for


def _config(tmp_path, method, **overrides):
    return parse_run_config(load_config_file("conf/tiny.toml"), {
        "method": method, "out": str(tmp_path / method), "budget.experts": "2,4,16",
        "train.local-steps": 2, **overrides})


# the FedAlign ablations are configurations of fedalign / hfedmoe-align (tests/unit/test_fedalign)
RUN_METHODS = [m for m in METHODS if not m.endswith(("-no-gate", "-no-reg", "-no-consistency"))]


@pytest.mark.parametrize("method", RUN_METHODS)
def test_every_method_runs_two_rounds(tmp_path, method):
    summary = run_experiment(_config(tmp_path, method))
    assert summary["method"] == method and summary["rounds"] == 2
    clients = summary["clients"]
    assert [c["client_id"] for c in clients] == [0, 1, 2]
    # same partitions for all: 452, 217, 1032 examples, minus each client's own test split
    assert [c["num_examples"] for c in clients] == [362, 174, 826]
    ignores_budgets = method in ("fedavg", "fedavg-full", "fedalign")
    assert all(c["within_budget"] for c in clients) != ignores_budgets
    if method == "fedavg-drop":  # clients whose budget cannot hold full training sit out
        assert [c["max_active_experts_per_batch"] for c in clients] == [0, 0, 16]
        records = read_metrics(tmp_path / method)[1:]
        assert all([c["local_steps"] for c in r["clients"]] == [0, 0, 2] for r in records)
        assert all(c["uploaded_tensors"] == 0 for r in records for c in r["clients"][:2])
    elif method in SPLIT_METHODS:  # budgets do not apply: the client part's 8 experts move
        assert [c["max_active_experts_per_batch"] for c in clients] == [8, 8, 8]
    elif method == "flex":  # one personal expert per MoE layer (2 layers), within budget
        assert [c["max_active_experts_per_batch"] for c in clients] == [2, 2, 2]
    elif not ignores_budgets:
        assert [c["max_active_experts_per_batch"] for c in clients] == [2, 4, 16]
    personal = summary["personal_accuracy_by_round"]
    assert personal[0] is None and all(0 <= a <= 1 for a in personal[1:])
    assert summary["final_personal_accuracy"] == personal[-1]


def _update(cid, n, usage, importance):
    state = {"router.0.weight": torch.full((2, 3), float(cid + 1))}
    return ClientUpdate(cid, n, state, usage, {}, importance=importance)


def test_uniform_gate_ablation_weights_the_gate_by_examples_only():
    config = parse_run_config({"method": "hfedmoe-uniform-gate", "hfedmoe.tau": 0.0})
    usage = torch.tensor([[0.9, 0.1]])
    updates = [_update(0, 10, usage, torch.tensor([[1.0, 0.0]])),
               _update(1, 30, usage, torch.tensor([[0.0, 0.0]]))]
    global_state = {"router.0.weight": torch.zeros(2, 3)}
    new, diagnostics = method_for(config).aggregate(global_state, updates)
    expected = (10 * 1.0 + 30 * 2.0) / 40  # |D_c| weights, whatever the importance
    assert torch.allclose(new["router.0.weight"], torch.full((2, 3), expected))
    importance_weighted, _ = method_for(parse_run_config(
        {"method": "hfedmoe", "hfedmoe.tau": 0.0})).aggregate(global_state, updates)
    assert torch.allclose(importance_weighted["router.0.weight"], torch.full((2, 3), 1.0))


def test_fedavg_agg_ablation_uploads_everything_and_no_ib_has_beta_zero(tmp_path):
    config = _config(tmp_path, "hfedmoe-fedavg-agg")
    method = method_for(config)
    assert method.sparse_upload is False and method.expert_aggregation == "fedavg"
    assert method_for(_config(tmp_path, "hfedmoe-no-ib")).beta == 0.0
    small = run_experiment(_config(tmp_path, "hfedmoe"))
    full_upload = run_experiment(config)
    assert full_upload["bytes_up"] > small["bytes_up"]
    # same selection, so the same experts learn per batch; only the upload differs
    for record in read_metrics(tmp_path / "hfedmoe-fedavg-agg")[1:]:
        assert all(c["uploaded_tensors"] == record["clients"][2]["uploaded_tensors"]
                   for c in record["clients"])


def test_expert_step_reaches_the_aggregation():
    """hfedmoe.expert-step = "data-share": an expert held by the client with 10 of 40
    examples moves a quarter of the way to its upload (Eq. 17 moves it all the way)."""
    usage = torch.tensor([[0.9, 0.1]])
    updates = [ClientUpdate(0, 10, {"expert.0.0.w": torch.full((2,), 4.0)}, usage, {},
                            importance=usage),
               ClientUpdate(1, 30, {}, usage, {}, importance=usage)]
    global_state = {"expert.0.0.w": torch.zeros(2)}
    for step, expected in (("holders", 4.0), ("data-share", 1.0)):
        config = parse_run_config({"method": "hfedmoe", "hfedmoe.expert-step": step})
        new, _ = method_for(config).aggregate(global_state, updates)
        assert torch.allclose(new["expert.0.0.w"], torch.full((2,), expected)), step
    variant = method_for(parse_run_config({"method": "hfedmoe-data-share"}))
    new, _ = variant.aggregate(global_state, updates)
    assert torch.allclose(new["expert.0.0.w"], torch.full((2,), 1.0))
