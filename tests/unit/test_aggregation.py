"""Sparse aggregation against an independent re-computation."""

import torch

from hfedmoe.aggregation import ClientUpdate, fedavg


def _update(client_id, n, state):
    return ClientUpdate(client_id, n, state, torch.zeros(1, 1), {})


def test_fedavg_equals_hand_computed_weighted_mean():
    g = {"a": torch.zeros(2, 2), "b": torch.ones(3)}
    u1 = _update(0, 10, {"a": torch.full((2, 2), 1.0), "b": torch.tensor([1.0, 2.0, 3.0])})
    u2 = _update(1, 30, {"a": torch.full((2, 2), 5.0), "b": torch.tensor([3.0, 2.0, 1.0])})
    new = fedavg(g, [u1, u2])
    assert torch.allclose(new["a"], torch.full((2, 2), (10 * 1 + 30 * 5) / 40))
    assert torch.allclose(new["b"], torch.tensor([2.5, 2.0, 1.5]))


def test_key_sent_by_nobody_keeps_its_value_and_partial_keys_average_over_senders():
    g = {"a": torch.tensor([7.0]), "b": torch.tensor([1.0])}
    u1 = _update(0, 10, {"b": torch.tensor([3.0])})
    u2 = _update(1, 90, {})
    new = fedavg(g, [u1, u2])
    assert torch.equal(new["a"], g["a"])
    assert torch.equal(new["b"], torch.tensor([3.0]))  # not diluted by the non-sender


def test_no_updates_keeps_everything():
    g = {"a": torch.randn(4)}
    assert torch.equal(fedavg(g, [])["a"], g["a"])
