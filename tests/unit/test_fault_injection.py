"""Fault and attack injection (hfedmoe.faults): deterministic failing sets of the configured
share, the two failure modes, and the two attacks computed by hand."""

import pytest
import torch

from hfedmoe import faults
from hfedmoe.config import parse_run_config


def _config(**overrides):
    return parse_run_config({"data.num-clients": 10, **overrides})


@pytest.mark.parametrize("rate, expected", [(0.0, 0), (0.04, 0), (0.05, 1), (0.3, 3),
                                            (0.55, 6), (0.99, 10)])
def test_the_failing_share_is_exact_and_deterministic(rate, expected):
    for server_round in range(1, 20):
        chosen = faults.failing_clients(7, server_round, 10, rate)
        assert len(chosen) == expected and chosen <= set(range(10))
        assert chosen == faults.failing_clients(7, server_round, 10, rate)


def test_the_failing_set_changes_with_round_and_seed_and_every_client_fails_fairly():
    sets = {faults.failing_clients(0, r, 10, 0.3) for r in range(1, 30)}
    assert len(sets) > 10  # not the same clients every round
    assert faults.failing_clients(0, 1, 10, 0.3) != faults.failing_clients(1, 1, 10, 0.3) or \
        faults.failing_clients(0, 2, 10, 0.3) != faults.failing_clients(1, 2, 10, 0.3)
    rounds = 2000
    failures = [0] * 10
    for r in range(rounds):
        for client in faults.failing_clients(3, r, 10, 0.3):
            failures[client] += 1
    assert all(abs(f / rounds - 0.3) < 0.05 for f in failures), failures
    # a sampled half of the clients fails at the configured share on average
    sampled = range(5)
    share = sum(len(faults.failing_clients(3, r, 10, 0.3) & set(sampled)) for r in range(rounds))
    assert abs(share / (rounds * 5) - 0.3) < 0.02


def test_raise_mode_fails_exactly_the_drawn_clients():
    config = _config(**{"faults.client-failure-rate": 0.3})
    failing = faults.failing_clients(config.seed, 4, 10, 0.3)
    for client in range(10):
        if client in failing:
            with pytest.raises(faults.InjectedFailure, match=f"client {client} in round 4"):
                faults.inject_failure(config, client, 4)
        else:
            faults.inject_failure(config, client, 4)


def test_hang_mode_sleeps_past_the_round_timeout_then_returns():
    config = _config(**{"faults.client-failure-rate": 0.3, "faults.failure-mode": "hang",
                        "federation.round-timeout": 5.0})
    failing = sorted(faults.failing_clients(config.seed, 1, 10, 0.3))
    slept = []
    faults.inject_failure(config, failing[0], 1, sleep=slept.append)
    assert slept == [7.0]
    healthy = next(c for c in range(10) if c not in failing)
    faults.inject_failure(config, healthy, 1, sleep=slept.append)
    assert slept == [7.0]


def test_off_by_default():
    config = _config()
    assert config.faults.client_failure_rate == 0 and not config.faults.attacker_ids
    for client in range(10):
        faults.inject_failure(config, client, 1, sleep=lambda s: pytest.fail("slept"))
    upload = {"a": torch.ones(2)}
    assert torch.equal(faults.attacked_upload(config.faults, 0, upload, {"a": torch.zeros(2)})["a"],
                       upload["a"])


@pytest.mark.parametrize("attack, expected", [("sign-flip", [-29.0, 1.0, 21.0]),
                                              ("scale", [31.0, 1.0, -19.0])])
def test_attacks_hand_computed(attack, expected):
    config = _config(**{"faults.attackers": "2,5", "faults.attack": attack,
                        "faults.attack-scale": 10.0})
    global_state = {"expert.0.1.w": torch.tensor([1.0, 1.0, 1.0]), "router.0.w": torch.zeros(2)}
    upload = {"expert.0.1.w": torch.tensor([4.0, 1.0, -1.0]),  # delta (3, 0, -2)
              "router.0.w": torch.zeros(2)}  # unchanged: stays bit-identical
    attacked = faults.attacked_upload(config.faults, 5, upload, global_state)
    assert torch.equal(attacked["expert.0.1.w"], torch.tensor(expected))
    assert torch.equal(attacked["router.0.w"], global_state["router.0.w"])
    assert attacked["expert.0.1.w"].dtype == torch.float32
    honest = faults.attacked_upload(config.faults, 3, upload, global_state)
    assert all(torch.equal(honest[k], upload[k]) for k in upload)
