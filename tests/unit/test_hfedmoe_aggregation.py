"""HFedMoE aggregation (Eqs. 16-21) against loop re-computations and its degenerate cases."""

import pytest
import torch

from hfedmoe.aggregation import (
    ClientUpdate,
    aggregate_experts,
    aggregate_gates,
    dominant_experts,
    fedavg,
    gate_weights,
    hfedmoe_aggregate,
    routing_consistency,
)

L, S = 2, 3


def _global_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for l in range(L):
        for e in range(S):
            state[f"expert.{l}.{e}.w"] = torch.randn(2, 2, generator=g)
            state[f"expert.{l}.{e}.b"] = torch.randn(2, generator=g)
        state[f"router.{l}.weight"] = torch.randn(S, 4, generator=g)
    state["shared.classifier.weight"] = torch.randn(5, 4, generator=g)
    return state


def _client(cid, n, seed, keys, usage=None, importance=None):
    g = torch.Generator().manual_seed(100 + seed)
    full = _global_state(1000 + seed)
    state = {k: full[k] + torch.randn(full[k].shape, generator=g) for k in keys}
    usage = torch.rand(L, S, generator=g) if usage is None else usage
    importance = torch.rand(L, S, generator=g) if importance is None else importance
    return ClientUpdate(cid, n, state, usage, {}, importance)


def _loop_weighted(global_state, updates, weight):
    out = {}
    for key, value in global_state.items():
        num, den = torch.zeros_like(value, dtype=torch.float64), 0.0
        for u in updates:
            w = weight(u, key)
            if key in u.state and w > 0:
                num += w * u.state[key].double()
                den += w
        out[key] = (num / den).float() if den > 0 else value
    return out


def test_client_update_keeps_its_old_positional_signature():
    update = ClientUpdate(3, 10, {}, torch.zeros(1, 1), {})
    assert update.importance is None


def test_dominant_experts_is_eq_16():
    usage = torch.tensor([[0.05, 0.2, 0.1], [0.0, 0.5, 0.099]])
    expected = [[usage[l, e].item() >= 0.1 for e in range(S)] for l in range(L)]
    assert dominant_experts(usage, 0.1).tolist() == expected
    assert dominant_experts(usage, 0.0).all()
    for tau in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            dominant_experts(usage, tau)


def test_aggregate_experts_is_eq_17_with_partial_uploads():
    g = torch.Generator().manual_seed(5)
    gs = _global_state()
    expert_keys = [k for k in gs if k.startswith("expert.")]
    updates, dominant = [], {}
    for cid, n in [(0, 10), (1, 30), (2, 7)]:
        keys = [k for k in expert_keys if torch.rand(1, generator=g) < 0.7]
        keys += ["router.0.weight", "shared.classifier.weight"]  # must be left alone
        updates.append(_client(cid, n, cid, keys))
        dominant[cid] = torch.rand(L, S, generator=g) < 0.6
    new = aggregate_experts(gs, updates, dominant)

    def weight(u, key):
        _, l, e, _ = key.split(".")
        in_s = key.startswith("expert.") and bool(dominant[u.client_id][int(l), int(e)])
        return u.num_examples if in_s else 0

    expected = _loop_weighted(gs, updates, lambda u, k: weight(u, k) if k.startswith("expert.")
                              else 0)
    for key in gs:
        assert torch.allclose(new[key], expected[key], atol=1e-6), key
    assert torch.equal(new["router.0.weight"], gs["router.0.weight"])
    assert torch.equal(new["shared.classifier.weight"], gs["shared.classifier.weight"])


def test_data_share_step_is_fedavg_with_the_non_holders_sending_the_global_value():
    """hfedmoe.expert-step = "data-share" against an independent re-computation: FedAvg by
    |D_c| over every client, where a client that did not upload an expert, or has it
    outside S_c, contributes the global value."""
    g = torch.Generator().manual_seed(11)
    gs = _global_state()
    expert_keys = [k for k in gs if k.startswith("expert.")]
    updates, dominant = [], {}
    for cid, n in [(0, 10), (1, 30), (2, 7), (3, 21)]:
        keys = [k for k in expert_keys if torch.rand(1, generator=g) < 0.7]
        updates.append(_client(cid, n, cid, keys + ["shared.classifier.weight"]))
        dominant[cid] = torch.rand(L, S, generator=g) < 0.6
    new = aggregate_experts(gs, updates, dominant, step="data-share")
    examples = sum(u.num_examples for u in updates)
    for key in expert_keys:
        _, l, e, _ = key.split(".")
        expected = sum(u.num_examples / examples * (
            u.state[key] if key in u.state and bool(dominant[u.client_id][int(l), int(e)])
            else gs[key]).double() for u in updates)
        assert torch.allclose(new[key].double(), expected, atol=1e-6), key
    # an expert some client holds moves less than under Eq. 17, in the same direction
    holders = aggregate_experts(gs, updates, dominant)
    moved = [k for k in expert_keys if not torch.equal(holders[k], gs[k])]
    assert moved
    for key in moved:
        full, damped = holders[key] - gs[key], new[key] - gs[key]
        share = float(damped.norm() / full.norm())
        assert 0 < share < 1 and torch.allclose(damped, share * full, atol=1e-5), key
    assert torch.equal(new["shared.classifier.weight"], gs["shared.classifier.weight"])
    with pytest.raises(ValueError, match="expert step 'all'"):
        aggregate_experts(gs, updates, dominant, step="all")


def test_expert_nobody_uploaded_or_nobody_dominates_is_bit_identical():
    gs = _global_state()
    before = {k: v.clone() for k, v in gs.items()}
    dominant = {0: torch.ones(L, S, dtype=torch.bool), 1: torch.zeros(L, S, dtype=torch.bool)}
    dominant[0][1, 2] = False
    updates = [_client(0, 5, 0, ["expert.0.0.w", "expert.1.2.w"]),
               _client(1, 9, 1, ["expert.0.1.w"])]  # client 1's S_c is empty
    new = aggregate_experts(gs, updates, dominant)
    for key in gs:
        if key != "expert.0.0.w":
            assert torch.equal(new[key], before[key]), key
    assert torch.allclose(new["expert.0.0.w"], updates[0].state["expert.0.0.w"])
    assert all(torch.equal(gs[k], before[k]) for k in gs)  # input not mutated


def test_routing_consistency_is_eq_18():
    dominant = {0: torch.tensor([[1, 0, 0], [0, 1, 0]]).bool(),
                1: torch.tensor([[1, 1, 0], [0, 0, 0]]).bool(),
                2: torch.zeros(L, S, dtype=torch.bool)}
    sets = {c: {(l, e) for l in range(L) for e in range(S) if m[l, e]} for c, m in dominant.items()}
    union = set().union(*sets.values())
    expected = {c: len(s & union) / len(union) for c, s in sets.items()}
    assert routing_consistency(dominant) == pytest.approx(expected)
    assert routing_consistency({0: torch.zeros(L, S, dtype=torch.bool)}) == {0: 0.0}


def _loop_gate_weights(usage, importance, dominant):
    union = {(l, e) for m in dominant.values() for l in range(L) for e in range(S) if m[l, e]}
    raw = {c: sum(float(usage[c][l, e]) * float(importance[c][l, e])
                  for l in range(L) for e in range(S) if dominant[c][l, e]) / len(union)
           for c in dominant}
    total = sum(raw.values())
    return {c: v / total for c, v in raw.items()}


def test_gate_weights_are_eqs_19_20_normalised_and_empty_sc_gets_zero():
    g = torch.Generator().manual_seed(3)
    usage = {c: torch.rand(L, S, generator=g) for c in range(4)}
    importance = {c: torch.rand(L, S, generator=g) for c in range(4)}
    dominant = {c: usage[c] >= 0.4 for c in range(4)}
    dominant[2] = torch.zeros(L, S, dtype=torch.bool)
    alpha = gate_weights(usage, importance, dominant)
    assert alpha == pytest.approx(_loop_gate_weights(usage, importance, dominant))
    assert sum(alpha.values()) == pytest.approx(1.0)
    assert alpha[2] == 0.0


def test_all_zero_gate_weights_keep_the_gate():
    empty = {c: torch.zeros(L, S, dtype=torch.bool) for c in range(2)}
    ones = {c: torch.ones(L, S) for c in range(2)}
    alpha = gate_weights(ones, ones, empty)
    assert alpha == {0: 0.0, 1: 0.0}
    gs = _global_state()
    updates = [_client(c, 10, c, ["router.0.weight", "router.1.weight"]) for c in range(2)]
    new = aggregate_gates(gs, updates, alpha)
    assert all(torch.equal(new[k], gs[k]) for k in gs)


def test_aggregate_gates_is_eq_21():
    gs = _global_state()
    routers = ["router.0.weight", "router.1.weight"]
    updates = [_client(c, 10, c, routers + ["expert.0.0.w"]) for c in range(3)]
    alpha = {0: 0.5, 1: 0.2, 2: 0.3}
    new = aggregate_gates(gs, updates, alpha)
    for key in routers:
        expected = sum(alpha[u.client_id] * u.state[key] for u in updates)
        assert torch.allclose(new[key], expected, atol=1e-6)
    assert torch.equal(new["expert.0.0.w"], gs["expert.0.0.w"])
    with pytest.raises(ValueError, match="gate weight"):
        aggregate_gates(gs, updates, {0: -1.0})


def test_full_budget_and_tau_zero_reduce_to_fedavg_for_experts_and_shared():
    gs = _global_state()
    updates = [_client(c, n, c, list(gs)) for c, n in [(0, 10), (1, 25), (2, 3)]]
    new, diagnostics = hfedmoe_aggregate(gs, updates, tau=0.0)
    reference = fedavg(gs, updates)
    for key in gs:
        if not key.startswith("router."):
            assert torch.equal(new[key], reference[key]), key
    alpha = _loop_gate_weights({u.client_id: u.usage for u in updates},
                               {u.client_id: u.importance for u in updates},
                               {u.client_id: torch.ones(L, S, dtype=torch.bool) for u in updates})
    for key in ("router.0.weight", "router.1.weight"):
        expected = sum(alpha[u.client_id] * u.state[key] for u in updates)
        assert torch.allclose(new[key], expected, atol=1e-6)
    assert diagnostics["dominant_global"] == L * S
    for u in updates:
        entry = diagnostics["clients"][u.client_id]
        assert entry["gate_weight"] == pytest.approx(alpha[u.client_id])
        assert entry["routing_consistency"] == 1.0
        assert entry["dominant_per_layer"] == [S] * L


def test_hfedmoe_aggregate_with_tau_uses_dominant_sets_and_reports_them():
    gs = _global_state()
    usage0 = torch.tensor([[0.5, 0.0, 0.5], [0.9, 0.05, 0.05]])
    usage1 = torch.tensor([[0.0, 0.8, 0.2], [0.05, 0.05, 0.9]])
    updates = [_client(0, 10, 0, list(gs), usage=usage0), _client(1, 30, 1, list(gs), usage=usage1)]
    new, diagnostics = hfedmoe_aggregate(gs, updates, tau=0.3)
    assert torch.allclose(new["expert.0.0.w"], updates[0].state["expert.0.0.w"])  # only client 0
    assert torch.allclose(new["expert.0.1.w"], updates[1].state["expert.0.1.w"])  # only client 1
    assert torch.equal(new["expert.1.1.w"], gs["expert.1.1.w"])  # nobody dominates
    assert diagnostics["dominant_global"] == 5
    assert diagnostics["clients"][0]["dominant_per_layer"] == [2, 1]
    assert diagnostics["clients"][1]["routing_consistency"] == pytest.approx(2 / 5)
    assert list(new) == list(gs)


def test_hfedmoe_aggregate_requires_importance_and_unique_clients():
    gs = _global_state()
    missing = ClientUpdate(0, 10, {}, torch.rand(L, S), {})
    with pytest.raises(ValueError, match="importance"):
        hfedmoe_aggregate(gs, [missing], tau=0.1)
    twice = _client(1, 10, 1, [])
    with pytest.raises(ValueError, match="same client_id"):
        hfedmoe_aggregate(gs, [twice, twice], tau=0.1)
    new, diagnostics = hfedmoe_aggregate(gs, [], tau=0.1)
    assert all(torch.equal(new[k], gs[k]) for k in gs) and diagnostics["clients"] == {}
