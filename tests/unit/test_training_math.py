"""Router statistics used in training, against independent loops."""

import torch

from hfedmoe.model.adapter import RoutingTrace
from hfedmoe.training import load_balancing_loss, sample_probabilities


def _trace(batch, seq, experts, k, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = [torch.softmax(torch.randn(batch * seq, experts, generator=g), -1) for _ in range(layers)]
    index = [p.topk(k, dim=-1).indices for p in probs]
    return RoutingTrace(probabilities=probs, top_k_index=index)


def test_sample_probabilities_is_mean_over_real_tokens():
    batch, seq, experts = 3, 5, 4
    trace = _trace(batch, seq, experts, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = sample_probabilities(trace, mask)  # (L, B, S)
    for layer, probs in enumerate(trace.probabilities):
        probs = probs.reshape(batch, seq, experts)
        for b in range(batch):
            real = [probs[b, t] for t in range(seq) if mask[b, t]]
            assert torch.allclose(got[layer, b], torch.stack(real).mean(0), atol=1e-6)


def test_load_balancing_loss_matches_switch_formula_and_ignores_padding():
    batch, seq, experts, k = 2, 4, 4, 2
    trace = _trace(batch, seq, experts, k)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    real = [i for i in range(batch * seq) if mask.reshape(-1)[i]]
    expected = []
    for probs, index in zip(trace.probabilities, trace.top_k_index):
        counts = [0.0] * experts
        for i in real:
            for e in index[i].tolist():
                counts[e] += 1
        share = [c / (len(real) * k) for c in counts]
        mean_p = [sum(float(probs[i, e]) for i in real) / len(real) for e in range(experts)]
        expected.append(experts * sum(f * p for f, p in zip(share, mean_p)))
    got = load_balancing_loss(trace, mask, experts)
    assert abs(float(got) - sum(expected) / len(expected)) < 1e-5


def test_load_balancing_loss_is_one_when_perfectly_uniform():
    experts = 4
    probs = torch.full((8, experts), 1.0 / experts)
    index = torch.arange(8).remainder(experts).unsqueeze(1)
    trace = RoutingTrace([probs], [index])
    assert abs(float(load_balancing_loss(trace, torch.ones(2, 4), experts)) - 1.0) < 1e-6


def test_all_padding_rows_have_no_routing_distribution():
    """A row of padding only (a text that tokenizes to nothing) is left out: every sample's
    G_e(x_i) sums to 1 over experts, so usage rows (Eq. 16) sum to 1 as validation expects."""
    batch, seq, experts = 3, 4, 4
    trace = _trace(batch, seq, experts, 2)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    got = sample_probabilities(trace, mask)  # (L, B', S)
    assert got.shape == (2, 2, experts)
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(2, 2), atol=1e-6, rtol=0)
    for layer, probs in enumerate(trace.probabilities):
        probs = probs.reshape(batch, seq, experts)
        torch.testing.assert_close(got[layer, 0], probs[0, :2].mean(0))
        torch.testing.assert_close(got[layer, 1], probs[2].mean(0))
