"""What a budget saves in exact backward FLOPs (deterministic; no timing), on tiny models of
families with grouped expert kernels and with the per-expert fallback (Switch)."""

import pytest
import torch

from hfedmoe.bench import count_step
from hfedmoe.config import parse_run_config
from hfedmoe.model import load_adapter
from hfedmoe.model.state import set_trainable
from hfedmoe.strategies import method_for


def _setup(family):
    config = parse_run_config({"model.name": f"tiny:{family}", "method": "hfedmoe"})
    adapter = load_adapter(config.model, num_labels=3, seed=0)
    params = list(set_trainable(adapter, "head").values())
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 30000, (8, 24), generator=g),
             "attention_mask": torch.ones(8, 24, dtype=torch.long),
             "labels": torch.randint(0, 3, (8,), generator=g)}
    return config, adapter, params, batch


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "switch_transformers"])
def test_backward_flops_shrink_with_the_budget_and_equal_plain_training_at_full(family):
    config, adapter, params, batch = _setup(family)
    total = adapter.geometry.total_experts
    method = method_for(config)
    plain = count_step(adapter, params, batch, None, total, "one-pass")
    flops = {}
    for budget in (2, 4, 8, total):
        selector = method.selector(budget, adapter.geometry, seed=0)
        flops[budget] = count_step(adapter, params, batch, selector, budget, "one-pass")
        # the forward is unchanged but for the per-layer importance (an einsum per layer)
        assert 0 <= flops[budget].forward_flops - plain.forward_flops < 1e-3 * plain.forward_flops
    assert flops[total].backward_flops == plain.backward_flops  # the plain path
    backward = [flops[b].backward_flops for b in (2, 4, 8)]
    assert backward[0] < backward[1] < backward[2] < plain.backward_flops
    none = count_step(adapter, params, batch, None, 0, "one-pass")
    assert none.backward_flops < backward[0]  # the part no budget removes
    state = [flops[b].trainable_state_bytes for b in (2, 4, 8, total)]
    assert state[0] < state[1] < state[2] <= state[3] == plain.trainable_state_bytes


def test_recompute_mode_pays_a_second_forward_of_the_active_experts():
    config, adapter, params, batch = _setup("qwen2_moe")
    selector = method_for(config).selector(4, adapter.geometry, seed=0)
    one_pass = count_step(adapter, params, batch, selector, 4, "one-pass")
    selector = method_for(config).selector(4, adapter.geometry, seed=0)
    recompute = count_step(adapter, params, batch, selector, 4, "recompute")
    assert 0 <= one_pass.forward_flops - recompute.forward_flops < 1e-3 * one_pass.forward_flops
    assert recompute.backward_flops > one_pass.backward_flops
