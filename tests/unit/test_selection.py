"""Eq. 15 against brute force over all subsets, the caps as properties, and beta = 0."""

import itertools

import numpy as np
import pytest
import torch

from hfedmoe.selection import (
    IBSelector,
    LayerQuotas,
    make_ib_selector,
    select_active_experts,
    selection_closeness,
    top_in_layer,
)


def _brute_force(score, routed, budget, per_layer):
    """Best summed score over ALL subsets of routed experts of the largest feasible size."""
    L, S = score.shape
    cells = [(l, e) for l in range(L) for e in range(S) if routed[l, e]]
    feasible = []
    for size in range(len(cells) + 1):
        for subset in itertools.combinations(cells, size):
            per = [sum(1 for (l, _) in subset if l == layer) for layer in range(L)]
            if size <= budget and (per_layer is None or max(per, default=0) <= per_layer):
                feasible.append(subset)
    largest = max(len(s) for s in feasible)
    best = max((s for s in feasible if len(s) == largest),
               key=lambda s: sum(float(score[l, e]) for l, e in s))
    return set(best)


def _as_set(mask):
    return {(int(l), int(e)) for l, e in torch.nonzero(mask)}


@pytest.mark.parametrize("seed", range(12))
def test_selection_equals_brute_force_argmax_on_tiny_cases(seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(2, 4, generator=g)  # negative scores included on purpose
    routed = torch.rand(2, 4, generator=g) < 0.7
    for budget in range(1, 9):
        for per_layer in (None, 1, 2, 3):
            got = _as_set(select_active_experts(score, routed, budget, per_layer))
            assert got == _brute_force(score, routed, budget, per_layer), (budget, per_layer)


def test_selection_never_exceeds_caps_and_fills_them_on_random_inputs():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        L, S = int(rng.integers(1, 5)), int(rng.integers(1, 9))
        score = torch.from_numpy(rng.normal(size=(L, S)))
        if seed % 3 == 0:  # many ties
            score = torch.round(score)
        routed = torch.from_numpy(rng.random((L, S)) < rng.random())
        budget = int(rng.integers(1, L * S + 2))
        per_layer = None if seed % 2 else int(rng.integers(1, S + 1))
        active = select_active_experts(score, routed, budget, per_layer)
        assert active.dtype == torch.bool and active.shape == (L, S)
        assert not (active & ~routed).any()  # never an unrouted expert
        per_cap = S if per_layer is None else per_layer
        assert int(active.sum()) <= budget
        assert (active.sum(dim=1) <= per_cap).all()
        reachable = int(routed.sum(dim=1).clamp_max(per_cap).sum())
        assert int(active.sum()) == min(budget, reachable)


def test_budget_at_least_routed_selects_all_routed_even_with_negative_scores():
    score = torch.tensor([[-5.0, 2.0, -1.0], [0.0, -3.0, 9.0]])
    routed = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.equal(select_active_experts(score, routed, 4), routed)
    assert torch.equal(select_active_experts(score, routed, 100), routed)


def test_unrouted_experts_are_never_selected_even_with_the_best_score():
    score = torch.tensor([[10.0, 1.0, 2.0]])
    routed = torch.tensor([[False, True, True]])
    assert _as_set(select_active_experts(score, routed, 1)) == {(0, 2)}


def test_ties_go_to_the_lower_layer_then_lower_expert():
    score = torch.ones(2, 3)
    routed = torch.ones(2, 3, dtype=torch.bool)
    assert _as_set(select_active_experts(score, routed, 2)) == {(0, 0), (0, 1)}
    assert _as_set(select_active_experts(score, routed, 3, per_layer_budget=1)) == {(0, 0), (1, 0)}
    score[1, 2] = 1.5
    assert _as_set(select_active_experts(score, routed, 2)) == {(1, 2), (0, 0)}


def test_tie_rule_holds_on_large_inputs_with_many_ties():
    g = torch.Generator().manual_seed(11)
    score = torch.randint(0, 3, (4, 40), generator=g).float()  # heavy ties
    routed = torch.rand(4, 40, generator=g) < 0.9
    ranked = sorted((-float(score[l, e]), l, e) for l in range(4) for e in range(40) if routed[l, e])
    for budget in (7, 50, 101):
        expected = {(l, e) for _, l, e in ranked[:budget]}
        assert _as_set(select_active_experts(score, routed, budget)) == expected


def test_global_budget_spans_layers():
    score = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]])
    routed = torch.ones(2, 3, dtype=torch.bool)
    assert _as_set(select_active_experts(score, routed, 3)) == {(0, 0), (0, 1), (0, 2)}
    assert _as_set(select_active_experts(score, routed, 3, per_layer_budget=2)) == \
        {(0, 0), (0, 1), (1, 2)}


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "budget"),
    ({"budget": 2, "per_layer_budget": 0}, "per_layer_budget"),
    ({"budget": 1.5}, "budget"),
])
def test_selection_rejects_bad_budgets(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_active_experts(torch.rand(2, 2), torch.ones(2, 2, dtype=torch.bool), **kwargs)


def test_selection_rejects_shape_mismatch_and_non_finite_scores():
    with pytest.raises(ValueError, match="shape"):
        select_active_experts(torch.rand(2, 3), torch.ones(2, 2, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="finite"):
        select_active_experts(torch.tensor([[float("nan"), 1.0]]),
                              torch.ones(1, 2, dtype=torch.bool), 1)


def _numpy_importance(probs, lam):
    p = probs.numpy().astype(np.float64)
    return lam * p.mean(axis=1) + (1 - lam) * p.max(axis=1)


def test_beta_zero_ranks_exactly_by_importance():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(3, 6, 8, generator=g) * 3, dim=-1)  # (L, B, S)
    routed = torch.rand(3, 8, generator=g) < 0.8
    importance = _numpy_importance(probs, 0.4)
    flat = [(-importance[l, e], l, e) for l in range(3) for e in range(8) if routed[l, e]]
    for budget in (1, 5, 11):
        expected = {(l, e) for _, l, e in sorted(flat)[:budget]}
        selection = make_ib_selector(lam=0.4, beta=0.0, budget=budget)(probs, routed)
        assert _as_set(selection.active) == expected
        assert np.allclose(selection.importance.numpy(), importance, atol=1e-6)


def test_beta_penalises_input_specific_experts():
    # Expert 0: high importance but routed very unevenly (large KL); expert 1: even, slightly less.
    probs = torch.tensor([[[0.98, 0.01, 0.01], [0.02, 0.55, 0.43],
                           [0.02, 0.55, 0.43], [0.02, 0.55, 0.43]]])  # (1, 4, 3)
    routed = torch.ones(1, 3, dtype=torch.bool)
    assert _as_set(make_ib_selector(0.0, 0.0, 1)(probs, routed).active) == {(0, 0)}
    with_ib = make_ib_selector(0.0, 3.0, 1)(probs, routed)
    assert _as_set(with_ib.active) == {(0, 1)}
    p = probs[0].double()
    kl0 = sum(float(g) * np.log(float(g) / float(p[:, 0].mean())) for g in p[:, 0]) / 4
    assert np.isclose(float(with_ib.score[0, 0]), 0.98 - 3.0 * kl0, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    ((1.2, 0.0, 2), "lambda"), ((0.5, -1.0, 2), "beta"), ((0.5, 0.0, 0), "budget"),
    ((0.5, float("inf"), 2), "beta"),
])
def test_selector_validates_its_hyperparameters(args, message):
    with pytest.raises(ValueError, match=message):
        make_ib_selector(*args)


def test_selector_is_frozen_and_needs_only_probs_and_routed():
    selector = make_ib_selector(0.5, 0.1, 2, per_layer_budget=1)
    assert isinstance(selector, IBSelector)
    with pytest.raises(AttributeError):
        selector.budget = 3
    probs = torch.softmax(torch.randn(2, 3, 4), dim=-1)
    out = selector(probs, torch.ones(2, 4, dtype=torch.bool))
    assert int(out.active.sum()) == 2 and (out.active.sum(dim=1) <= 1).all()


# --- one-pass selection: per-layer quotas ------------------------------------------------------

def _one_pass(quotas, score, routed):
    """What the banks do in one forward: layer by layer, top ``quotas.take`` of each layer."""
    quotas.start_batch()
    return torch.stack([top_in_layer(score[l], routed[l], quotas.take(l, int(routed[l].sum())))
                        for l in range(score.shape[0])])


def test_one_layer_one_pass_equals_exact_eq15():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        score = torch.randn(1, 8, generator=g)
        routed = torch.rand(1, 8, generator=g) < 0.7
        budget = int(torch.randint(1, 9, (1,), generator=g))
        got = _one_pass(LayerQuotas(budget, 1), score, routed)
        assert torch.equal(got, select_active_experts(score, routed, budget))


def test_quotas_split_evenly_carry_unused_share_and_never_exceed_the_caps():
    quotas = LayerQuotas(7, 3)
    assert quotas.quota == [3, 2, 2]
    quotas.start_batch()
    assert [quotas.take(0, 1), quotas.take(1, 8), quotas.take(2, 8)] == [1, 4, 2]  # 2 carried
    capped = LayerQuotas(7, 3, per_layer_budget=3)
    capped.start_batch()
    assert [capped.take(0, 0), capped.take(1, 8), capped.take(2, 8)] == [0, 3, 3]
    g = torch.Generator().manual_seed(2)
    for _ in range(200):  # random routing: the budget and the cap hold in every batch
        layers, budget = 4, int(torch.randint(1, 20, (1,), generator=g))
        cap = int(torch.randint(1, 6, (1,), generator=g))
        quotas = LayerQuotas(budget, layers, cap)
        for _ in range(3):
            score = torch.randn(layers, 8, generator=g)
            routed = torch.rand(layers, 8, generator=g) < 0.5
            chosen = _one_pass(quotas, score, routed)
            assert int(chosen.sum()) <= budget and int(chosen.sum(dim=1).max()) <= cap
            assert not bool((chosen & ~routed).any())
            quotas.observe(select_active_experts(score, routed, budget, cap))


def test_quotas_follow_the_previous_exact_solution():
    """With the same batch twice, the second one-pass choice is the exact Eq. 15 set."""
    g = torch.Generator().manual_seed(3)
    score, routed = torch.randn(3, 8, generator=g), torch.ones(3, 8, dtype=torch.bool)
    score[0] += 5.0  # layer 0 holds the best experts: Eq. 15 takes all 6 there
    quotas = LayerQuotas(6, 3)
    first = _one_pass(quotas, score, routed)
    exact = select_active_experts(score, routed, 6)
    assert first.sum(dim=1).tolist() == [2, 2, 2] and exact.sum(dim=1).tolist() == [6, 0, 0]
    overlap, share = selection_closeness(first, exact, score)
    assert overlap == 2 / 6 and 0 < share < 1
    quotas.observe(exact)
    second = _one_pass(quotas, score, routed)
    assert torch.equal(second, exact)
    assert selection_closeness(second, exact, score) == (1.0, 1.0)
