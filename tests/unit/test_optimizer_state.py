"""Optimizer state within the budget (budget.optimizer-state): measured after every step."""

import dataclasses

import pytest
import torch

from hfedmoe.client import build_model, client_datasets, local_settings
from hfedmoe.config import load_config_file, parse_run_config
from hfedmoe.model.state import read_state, set_trainable, write_state
from hfedmoe.strategies import method_for
from hfedmoe.training import train_locally

BUDGET = 4  # of tiny:qwen2_moe's 16 experts


@pytest.fixture(scope="module")
def client():
    config = parse_run_config(load_config_file("conf/tiny.toml"), {"method": "hfedmoe"})
    data = client_datasets(config, 0)
    adapter = build_model(config, data.num_labels)
    params = set_trainable(adapter, "head")
    return config, data, adapter, params, read_state(params)


@pytest.mark.parametrize("mode", ["one-pass", "recompute"])
def test_batch_mode_never_holds_more_than_the_budget_round_mode_holds_the_union(client, mode):
    config, data, adapter, params, initial = client
    held = {}
    for state in ("batch", "round"):
        write_state(params, initial)
        settings = dataclasses.replace(local_settings(config, seed=3, local_steps=8),
                                       budget_mode=mode, optimizer_state=state)
        selector = method_for(config).selector(BUDGET, adapter.geometry, seed=3)
        result = train_locally(adapter, list(params.values()), data.train, settings, selector)
        assert result.max_active_experts_per_batch <= BUDGET
        held[state] = (result.max_experts_with_optimizer_state,
                       result.peak_memory_estimate_bytes,
                       int(result.trained_experts.sum()))
    assert 1 <= held["batch"][0] <= BUDGET
    assert held["round"][0] == held["round"][2] > BUDGET  # every expert trained in the round
    assert held["batch"][1] < held["round"][1]  # and the estimate charges what is held


def test_full_training_keeps_every_trained_expert_state(client):
    config, data, adapter, params, initial = client
    write_state(params, initial)
    result = train_locally(adapter, list(params.values()), data.train,
                           local_settings(config, seed=3, local_steps=3), None)
    assert result.max_experts_with_optimizer_state == int(result.trained_experts.sum())
