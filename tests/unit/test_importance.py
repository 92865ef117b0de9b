"""Eqs. 3-5, 10-11 and 14 against plain-Python re-computations of method.md's formulas."""

import math

import pytest
import torch

from hfedmoe.importance import expert_importance, ib_score, routed_experts, routing_kl


def _random_probs(seed, layers=2, samples=5, experts=4):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(layers, samples, experts, generator=g) * 2, dim=-1)


def _loop_importance(probs, lam):
    L, B, S = probs.shape
    out = [[0.0] * S for _ in range(L)]
    for l in range(L):
        for e in range(S):
            column = [float(probs[l, i, e]) for i in range(B)]
            out[l][e] = lam * sum(column) / B + (1 - lam) * max(column)
    return torch.tensor(out, dtype=torch.float64)


def _loop_kl(probs):
    L, B, S = probs.shape
    out = [[0.0] * S for _ in range(L)]
    for l in range(L):
        for e in range(S):
            column = [float(probs[l, i, e]) for i in range(B)]
            prior = sum(column) / B
            out[l][e] = sum(g * math.log(g / prior) for g in column if g > 0) / B
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_importance_matches_eqs_3_to_5(lam):
    probs = _random_probs(1)
    got = expert_importance(probs, lam)
    assert got.shape == (2, 4)
    assert torch.allclose(got.double(), _loop_importance(probs, lam), atol=1e-6)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_importance_rejects_lambda_outside_unit_interval(lam):
    with pytest.raises(ValueError, match="lambda"):
        expert_importance(_random_probs(0), lam)


def test_importance_rejects_wrong_shape_and_negative_probabilities():
    with pytest.raises(ValueError, match="L, B, S"):
        expert_importance(torch.rand(3, 4), 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        expert_importance(-_random_probs(0), 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_routing_kl_matches_eqs_10_11(seed):
    probs = _random_probs(seed, layers=3, samples=6, experts=5)
    assert torch.allclose(routing_kl(probs).double(), _loop_kl(probs), atol=1e-6)


def test_routing_kl_zero_probabilities_and_zero_prior():
    probs = torch.tensor([[[0.0, 0.5, 0.5],
                           [0.0, 1.0, 0.0],
                           [0.0, 0.2, 0.8]]])  # (1, 3, 3); expert 0 never chosen: prior 0
    kl = routing_kl(probs)
    assert torch.isfinite(kl).all()
    assert kl[0, 0] == 0.0
    assert torch.allclose(kl.double(), _loop_kl(probs), atol=1e-7)  # 0 log 0 = 0 for expert 2


def test_routing_kl_is_zero_for_identical_samples_and_positive_otherwise():
    same = torch.tensor([0.1, 0.6, 0.3]).repeat(1, 4, 1)  # (1, 4, 3)
    assert torch.allclose(routing_kl(same), torch.zeros(1, 3), atol=1e-7)
    assert (routing_kl(_random_probs(3)) > 0).all()


def test_ib_score_is_eq_14_and_beta_zero_is_importance():
    importance, kl = torch.rand(2, 3), torch.rand(2, 3)
    expected = [[float(importance[l, e]) - 0.7 * float(kl[l, e]) for e in range(3)]
                for l in range(2)]
    assert torch.allclose(ib_score(importance, kl, 0.7), torch.tensor(expected), atol=1e-6)
    assert torch.equal(ib_score(importance, kl, 0.0), importance)
    with pytest.raises(ValueError, match="beta"):
        ib_score(importance, kl, -0.1)
    with pytest.raises(ValueError, match="differ"):
        ib_score(importance, kl[:, :2], 0.1)


def test_routed_experts_counts_real_tokens_and_ignores_dropped_slots():
    num_experts = 4
    layer0 = torch.tensor([[0, 1], [2, 4], [3, 3]])  # 4 = dropped slot
    layer1 = torch.tensor([[1, 4], [3, 4], [0, 2]])
    mask = torch.tensor([True, True, False])  # the third token is padding
    got = routed_experts([layer0, layer1], mask, num_experts)
    expected = torch.zeros(2, num_experts, dtype=torch.bool)
    for layer, index in enumerate([layer0, layer1]):
        for token in range(3):
            for slot in range(2):
                e = int(index[token, slot])
                if bool(mask[token]) and e < num_experts:
                    expected[layer, e] = True
    assert torch.equal(got, expected)
    assert not got[0, 3] and not got[1, 0] and got[1, 3]  # padding does not count


def test_routed_experts_rejects_bad_indices_and_shapes():
    with pytest.raises(ValueError, match="outside"):
        routed_experts([torch.tensor([[5, 0]])], torch.tensor([True]), 4)
    with pytest.raises(ValueError, match="shape"):
        routed_experts([torch.tensor([[1, 0]])], torch.tensor([True, True]), 4)
