"""HFedMoE end to end (in-process, tiny MoE): budgets are honoured as measured, small budgets
upload fewer bytes, untrained experts stay bit-identical, diagnostics are recorded."""

import torch

from hfedmoe.client import build_model
from hfedmoe.config import load_config_file, parse_run_config
from hfedmoe.data import client_train_set, load_corpus, tokenize
from hfedmoe.model import load_tokenizer
from hfedmoe.model.state import read_state, set_trainable
from hfedmoe.report import read_metrics
from hfedmoe.runner import run_experiment
from hfedmoe.strategies import method_for
from hfedmoe.training import LocalTrainingSettings, train_locally

TOTAL = 16  # tiny:qwen2_moe: 2 MoE layers x 8 experts


def _config(tmp_path, name, **overrides):
    return parse_run_config(load_config_file("conf/tiny.toml"),
                            {"method": "hfedmoe", "out": str(tmp_path / name), **overrides})


def test_budgets_are_honoured_and_small_budgets_upload_less(tmp_path):
    small = run_experiment(_config(tmp_path, "small", **{"budget.experts": "2,4,8"}))
    full = run_experiment(_config(tmp_path, "full", **{"budget.experts": "all"}))
    assert [c["budget_experts"] for c in small["clients"]] == [2, 4, 8]
    for record in read_metrics(tmp_path / "small")[1:]:
        for client in record["clients"]:
            assert 1 <= client["max_active_experts_per_batch"] <= client["budget_experts"]
            assert sum(client["active_experts_per_layer"]) <= TOTAL
            assert "gate_weight" in client and "routing_consistency" in client
        assert abs(sum(c["gate_weight"] for c in record["clients"]) - 1) < 1e-6
        assert "dominant_global" in record
    assert [c["budget_experts"] for c in full["clients"]] == [TOTAL] * 3
    assert small["bytes_up"] < full["bytes_up"]
    assert small["bytes_down"] == full["bytes_down"]  # the global model goes down in full
    assert (tmp_path / "small" / "experts.png").stat().st_size > 1000


def test_inactive_experts_are_bit_identical_after_a_local_round():
    config = parse_run_config(load_config_file("conf/tiny.toml"), {"method": "hfedmoe"})
    corpus = load_corpus(config.data)
    data = tokenize(client_train_set(corpus, config.data, config.seed, 0),
                    load_tokenizer(config.model), config.model.max_length)
    adapter = build_model(config, len(corpus.label_names))
    params = set_trainable(adapter, config.model.trainable_non_expert)
    before = read_state(params)
    settings = LocalTrainingSettings(local_steps=3, batch_size=8, lr=1e-2, weight_decay=0.0,
                                     aux_loss_coef=0.01, seed=1)
    selector = method_for(config).selector(3, adapter.geometry, seed=1)
    result = train_locally(adapter, list(params.values()), data, settings, selector)
    after = read_state(params)
    assert result.max_active_experts_per_batch <= 3
    trained = result.trained_experts
    assert 0 < int(trained.sum()) < TOTAL
    for key in before:
        if key.startswith("expert."):
            layer, expert = (int(x) for x in key.split(".")[1:3])
            same = torch.equal(before[key], after[key])
            assert same != bool(trained[layer, expert]), key
    # the upload holds only trained experts that are also dominant (u_c >= tau)
    upload = method_for(config).upload(after, result)
    uploaded = {tuple(int(x) for x in k.split(".")[1:3]) for k in upload if k.startswith("expert.")}
    dominant = result.usage >= config.hfedmoe.tau
    assert uploaded == {(l, e) for l in range(2) for e in range(8)
                        if trained[l, e] and dominant[l, e]}
    assert all(k in upload for k in after if not k.startswith("expert."))


def test_node_config_budget_wins_over_the_run_config(tmp_path):
    """Deployment path: a SuperNode's node config `budget=...` goes through the same function."""
    from hfedmoe.federation.client_app import app as client_app
    from hfedmoe.federation.grids import InProcessGrid
    from hfedmoe.federation.server_app import run_server

    config = _config(tmp_path, "nodes", **{"budget.experts": "all", "num-server-rounds": 1,
                                           "train.local-steps": 2})
    grid = InProcessGrid(client_app, 3, node_configs=[{"budget": "3"}, {}, {"budget": "50%"}])
    summary = run_server(grid, config)
    assert [c["budget_experts"] for c in summary["clients"]] == [3, TOTAL, TOTAL // 2]
    assert [c["max_active_experts_per_batch"] <= c["budget_experts"]
            for c in summary["clients"]] == [True] * 3
