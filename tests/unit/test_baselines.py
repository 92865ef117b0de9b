"""fedmoe and flex: choice of experts, uploads and aggregation against hand computations."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.aggregation import ClientUpdate
from hfedmoe.config import parse_run_config
from hfedmoe.model.adapter import MoEGeometry, RoutingTrace
from hfedmoe.strategies import ClientPlan, method_for, plan_round
from hfedmoe.strategies.fedmoe import HeldExpertsSelector, sub_moe
from hfedmoe.strategies.flex import personal_experts
from hfedmoe.training import LocalTrainingResult

GEOMETRY = MoEGeometry(num_layers=2, num_experts=3, top_k=1)
KEYS = ["expert.0.0.w", "expert.0.1.w", "expert.1.2.w", "router.0.weight", "router.1.weight",
        "shared.head.weight"]


def _method(name, **overrides):
    return method_for(parse_run_config({"method": name, **overrides}))


def _update(cid, n, state):
    return ClientUpdate(cid, n, state, torch.zeros(2, 3), {})


def _result(trained):
    trained = torch.tensor(trained, dtype=torch.bool)
    return LocalTrainingResult(10, 0.0, trained, torch.zeros(2, 3), None, 1, 0, 0.0, 1)


def _top_by_count(counts, budget, per_layer=None):
    """Independent: sort (layer, expert) by (-count, layer, expert), take greedily."""
    order = sorted(((-int(counts[l, e]), l, e) for l in range(counts.shape[0])
                    for e in range(counts.shape[1])))
    chosen, per = set(), {}
    for _, layer, expert in order:
        if len(chosen) == budget:
            break
        if per_layer is not None and per.get(layer, 0) >= per_layer:
            continue
        chosen.add((layer, expert))
        per[layer] = per.get(layer, 0) + 1
    return chosen


def _as_set(mask):
    return {tuple(i) for i in torch.nonzero(mask).tolist()}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget, per_layer", [(1, None), (3, None), (4, 2), (8, None)])
def test_sub_moe_is_the_top_budget_experts_by_activation_count(seed, budget, per_layer):
    counts = torch.randint(0, 6, (3, 4), generator=torch.Generator().manual_seed(seed))
    assert _as_set(sub_moe(counts, budget, per_layer)) == _top_by_count(counts, budget, per_layer)


def test_fedmoe_plan_probes_once_and_trains_only_held_routed_experts():
    calls = []

    def probe():
        calls.append(1)
        return torch.tensor([[5, 0, 9], [1, 7, 2]])

    plan = plan_round(_method("fedmoe"), 2, GEOMETRY, 0, probe, {})
    assert len(calls) == 1 and plan.personal_keys(KEYS) == frozenset()
    assert _as_set(plan.selector.held) == {(0, 2), (1, 1)}
    # a batch routing to experts (0, 0), (0, 2) and (1, 2): only the held (0, 2) learns
    trace = RoutingTrace([torch.zeros(2, 3)] * 2,
                         [torch.tensor([[0], [2]]), torch.tensor([[2], [2]])])
    selection = plan.selector(trace, torch.ones(1, 2, dtype=torch.int64))
    assert _as_set(selection.active) == {(0, 2)}


def test_fedmoe_uploads_trained_experts_routers_and_shared():
    trained = {key: torch.ones(1) for key in KEYS}
    result = _result([[False, True, False], [False, False, False]])
    upload = _method("fedmoe").upload(trained, result)
    assert sorted(upload) == ["expert.0.1.w", "router.0.weight", "router.1.weight",
                              "shared.head.weight"]


def test_fedmoe_aggregates_each_expert_over_its_holders_and_the_rest_over_all():
    g = {"expert.0.0.w": torch.tensor([7.0]), "expert.0.1.w": torch.tensor([0.0]),
         "router.0.weight": torch.tensor([0.0]), "shared.head.weight": torch.tensor([0.0])}
    updates = [
        _update(0, 10, {"expert.0.1.w": torch.tensor([1.0]), "router.0.weight": torch.tensor([1.0]),
                        "shared.head.weight": torch.tensor([2.0])}),
        _update(1, 30, {"expert.0.1.w": torch.tensor([5.0]), "router.0.weight": torch.tensor([3.0]),
                        "shared.head.weight": torch.tensor([4.0])}),
        _update(2, 60, {"router.0.weight": torch.tensor([0.5]),
                        "shared.head.weight": torch.tensor([1.0])}),
    ]
    new, diagnostics = _method("fedmoe").aggregate(g, updates)
    assert torch.equal(new["expert.0.0.w"], torch.tensor([7.0]))  # nobody held it
    assert torch.allclose(new["expert.0.1.w"], torch.tensor([(10 * 1 + 30 * 5) / 40]))
    expected_router = (10 * 1 + 30 * 3 + 60 * 0.5) / 100
    assert torch.allclose(new["router.0.weight"], torch.tensor([expected_router]))
    assert torch.allclose(new["shared.head.weight"], torch.tensor([(20 + 120 + 60) / 100]))
    assert diagnostics == {"experts_with_holders": 1}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [1, 2, 3, 10])
def test_flex_personal_experts_are_each_layers_most_used_within_budget(seed, budget):
    counts = torch.randint(0, 4, (3, 5), generator=torch.Generator().manual_seed(seed))
    chosen = _as_set(personal_experts(counts, budget))
    # independent: per layer the first maximum; keep the `budget` layers with the highest
    tops = [(layer, max(range(5), key=lambda e: (counts[layer, e], -e))) for layer in range(3)]
    ranked = sorted(tops, key=lambda t: (-int(counts[t]), t[0]))
    assert chosen == set(ranked[:budget])


def test_flex_plan_probes_only_without_stored_personal_state():
    method = _method("flex")
    plan = plan_round(method, 4, GEOMETRY, 0, lambda: torch.tensor([[1, 5, 2], [3, 0, 3]]), {})
    assert _as_set(plan.personal_experts) == {(0, 1), (1, 0)}
    assert plan.personal_keys(KEYS) == {"expert.0.1.w", "router.0.weight", "router.1.weight"}
    stored = {"expert.0.0.w": torch.zeros(1), "expert.1.2.w": torch.zeros(1),
              "router.0.weight": torch.zeros(1)}

    def no_probe():
        raise AssertionError("a client with personal experts must not choose again")

    again = plan_round(method, 4, GEOMETRY, 1, no_probe, stored)
    assert _as_set(again.personal_experts) == {(0, 0), (1, 2)}
    assert again.personal_keys(KEYS) == {"expert.0.0.w", "expert.1.2.w", "router.0.weight",
                                         "router.1.weight"}
    assert isinstance(again.selector, HeldExpertsSelector)
    with pytest.raises(ValueError, match="exceed the budget"):
        plan_round(method, 1, GEOMETRY, 1, no_probe, stored)


def test_flex_uploads_shared_trainables_only():
    trained = {key: torch.ones(1) for key in KEYS}
    upload = _method("flex").upload(trained, _result([[True, True, True], [True, True, True]]))
    assert sorted(upload) == ["shared.head.weight"]


def test_flex_never_aggregates_experts_or_routers_even_if_sent():
    g = {"expert.0.0.w": torch.tensor([7.0]), "router.0.weight": torch.tensor([1.0]),
         "shared.head.weight": torch.tensor([0.0])}
    updates = [_update(0, 10, {key: torch.tensor([2.0]) for key in g}),
               _update(1, 30, {"shared.head.weight": torch.tensor([6.0])})]
    new, _ = _method("flex").aggregate(g, updates)
    assert torch.equal(new["expert.0.0.w"], torch.tensor([7.0]))
    assert torch.equal(new["router.0.weight"], torch.tensor([1.0]))
    assert torch.allclose(new["shared.head.weight"], torch.tensor([(20 + 180) / 40]))
    # the failure mode this guards against: plain FedAvg would have moved them
    fedavg_new, _ = _method("fedavg").aggregate(g, updates)
    assert not torch.equal(fedavg_new["expert.0.0.w"], g["expert.0.0.w"])


def test_methods_without_a_plan_keep_their_selector_and_no_personal_state():
    plan = plan_round(_method("random-subset"), 2, GEOMETRY, 3, lambda: 1 / 0, {})
    assert isinstance(plan, ClientPlan) and plan.personal_keys(KEYS) == frozenset()
    assert plan.selector is not None


@pytest.mark.parametrize("name", ["fedmoe", "flex"])
def test_selector_without_a_plan_uses_the_batchs_own_counts(name):
    # batch counts: layer 0 -> experts 0 (x3), 1 (x1); layer 1 -> expert 2 (x2), 0 (x2)
    trace = RoutingTrace([torch.zeros(4, 3)] * 2, [torch.tensor([[0], [0], [0], [1]]),
                                                   torch.tensor([[2], [0], [2], [0]])])
    active = _method(name).selector(2, GEOMETRY, 0)(trace, torch.ones(1, 4, dtype=torch.int64))
    assert _as_set(active.active) == {(0, 0), (1, 0)}  # ties: lower (layer, expert) first


def test_a_robust_wrapper_keeps_the_round_plan():
    method = _method("fedmoe", **{"robust.aggregation": "clip"})
    assert type(method).__name__ == "RobustMethod"
    plan = plan_round(method, 1, GEOMETRY, 0, lambda: torch.tensor([[0, 0, 1], [4, 0, 0]]), {})
    assert _as_set(plan.selector.held) == {(1, 0)}
