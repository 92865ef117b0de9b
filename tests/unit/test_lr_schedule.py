"""`train.lr-schedule`: the clients' learning rate over the rounds (hfedmoe.client.round_lr),
against the cosine formula written out independently, and as the client's round uses it."""

from __future__ import annotations

import math

import pytest
import torch

from hfedmoe.client import ClientResources, build_model, round_lr, run_client_round
from hfedmoe.config import ConfigError, load_config_file, parse_run_config
from hfedmoe.model.state import read_state, set_trainable


def _config(**overrides):
    return parse_run_config({"num-server-rounds": 4, "train.lr": 0.002, **overrides})


def test_constant_keeps_train_lr_in_every_round():
    config = _config(**{"train.lr-schedule": "constant"})
    assert [round_lr(config, r) for r in range(1, 5)] == [0.002] * 4


def test_cosine_anneals_from_lr_towards_lr_min():
    config = _config(**{"train.lr-schedule": "cosine", "train.lr-min": 0.0002})
    got = [round_lr(config, r) for r in range(1, 5)]
    # R = 4: cos(0), cos(pi/4), cos(pi/2), cos(3pi/4)
    half = 0.0018 / 2
    expected = [0.002, 0.0002 + half * (1 + math.sqrt(0.5)), 0.0002 + half,
                0.0002 + half * (1 - math.sqrt(0.5))]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[-1] > 0.0002  # the last round still learns
    assert round_lr(config, 9) == got[-1]  # past R: R's


@pytest.mark.parametrize("overrides, fragment", [
    ({"train.lr-schedule": "linear"}, "expected one of 'constant', 'cosine'"),
    ({"train.lr-min": 0.002}, "expected a number >= 0 below train.lr (0.002)"),
    ({"train.lr-min": -1.0}, "expected a number >= 0 below train.lr"),
])
def test_bad_schedules_are_refused_in_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        _config(**overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_client_round_trains_at_its_rounds_lr(tmp_path):
    """Round 3 of a cosine run trains exactly like a constant run at round_lr(3), and not like
    one at train.lr: the server round reaches the optimizer."""
    base = {**load_config_file("conf/tiny.toml"), "method": "fedavg", "data.num-clients": 2,
            "train.local-steps": 2, "num-server-rounds": 4, "out": str(tmp_path)}
    cosine = parse_run_config(base, {"train.lr-schedule": "cosine"})
    adapter = build_model(cosine, 5)
    initial = read_state(set_trainable(adapter, cosine.model.trainable_non_expert))
    resources = ClientResources()

    def upload(config):
        return run_client_round(config, 0, 3, initial, resources=resources).upload

    constant = {"train.lr-schedule": "constant"}
    at_round_lr = parse_run_config(base, {**constant, "train.lr": round_lr(cosine, 3)})
    scheduled, expected, unscheduled = (upload(cosine), upload(at_round_lr),
                                        upload(parse_run_config(base, constant)))
    assert round_lr(cosine, 3) < cosine.train.lr
    assert all(torch.equal(scheduled[k], expected[k]) for k in expected)
    assert any(not torch.equal(scheduled[k], unscheduled[k]) for k in expected)
