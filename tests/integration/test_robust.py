"""Attacks and defences end to end: whole in-process federations of a tiny MoE (issue #5).

5 clients (IID partitions of equal size), 1 of them the attacker (client 4). FedAvg with full
budgets: every client trains and uploads every expert, so per-expert statistics see all 5.
HFedMoE with 50% budgets: sparse uploads of trained dominant experts (an expert's statistics
see only the clients that uploaded it), importance-weighted gate. Criteria: the distance of
the final global trainable state from the honest run's (no attacker), relative to how far the
honest run moved from the initial model (``progress``), and the final test loss (the model is
random: accuracy is near chance, loss is not). First the attack must hurt the undefended run;
then each defence must bring the final state close to the honest one.
"""

from pathlib import Path

import pytest
import torch

from hfedmoe import checkpoint as ckpt
from hfedmoe.client import build_model, run_client_round
from hfedmoe.config import load_config_file, parse_run_config
from hfedmoe.faults import failing_clients
from hfedmoe.model.state import read_state, set_trainable
from hfedmoe.report import read_metrics
from hfedmoe.runner import run_experiment
from hfedmoe.validation import update_norm

ATTACKER = 4
BASE = {"method": "fedavg", "budget.experts": "all", "data.num-clients": 5,
        "data.partition": "iid", "num-server-rounds": 2, "train.local-steps": 3,
        # a constant lr: round 2's updates as large as round 1's (under cosine half), so that
        # the attacker's 10x update in the last round is the threat the defences face
        "train.lr-schedule": "constant"}


def _config(out, **overrides):
    return parse_run_config(load_config_file("conf/tiny.toml"),
                            {**BASE, "out": str(out), **overrides})


def _final_state(config):
    """Run ``config``; the final global trainable state (its last checkpoint)."""
    run_experiment(config)
    return ckpt.load_latest(Path(config.out) / ckpt.CHECKPOINT_DIR).global_state


def _test_loss(out):
    """(initial, final) loss on the global test split."""
    rounds = read_metrics(out)
    return rounds[0]["loss"], rounds[-1]["loss"]


def _distance(a, b):
    return float(torch.sqrt(sum((a[k].double() - b[k].double()).pow(2).sum() for k in a)))


VARIANTS = {"fedavg": {"method": "fedavg"},  # every client trains and uploads every expert
            # budgeted: 8 of 16 experts learn per batch; uploads trained AND dominant experts
            "hfedmoe": {"method": "hfedmoe", "budget.experts": "50%"}}
DEFENCES = {"mean": {}, "trimmed-mean": {"robust.aggregation": "trimmed-mean",
                                          "robust.trim-fraction": 0.2},
            "clip": {"robust.aggregation": "clip"}}  # clip bound: the round's median norm


class HonestRuns:
    """Runs without attacker, one per (method, aggregation), made once on demand."""

    def __init__(self, root):
        self.root, self._final = root, {}
        config = _config(root / "initial")
        adapter = build_model(config, num_labels=5)  # BBC News: 5 classes
        self.initial = read_state(set_trainable(adapter, config.model.trainable_non_expert))

    def out(self, method, aggregation):
        return self.root / f"{method}-{aggregation}"

    def final(self, method, aggregation):
        if (method, aggregation) not in self._final:
            self._final[method, aggregation] = _final_state(_config(
                self.out(method, aggregation), **VARIANTS[method], **DEFENCES[aggregation]))
        return self._final[method, aggregation]

    def progress(self, method):
        """How far the honest undefended run moved the model: the unit of every distance."""
        return _distance(self.final(method, "mean"), self.initial)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    return HonestRuns(tmp_path_factory.mktemp("honest"))


def _attack_effect(tmp_path, honest, method, aggregation, **attack):
    """Distance of the attacked run's final state from the honest run under the same
    aggregation, and from the honest undefended run (both / progress); its final test loss."""
    out = tmp_path / f"{method}-{aggregation}"
    final = _final_state(_config(out, **VARIANTS[method], **DEFENCES[aggregation], **attack))
    progress = honest.progress(method)
    return (_distance(final, honest.final(method, aggregation)) / progress,
            _distance(final, honest.final(method, "mean")) / progress,
            _test_loss(out)[1])


BOTH = ("trimmed-mean", "clip")


@pytest.mark.parametrize("method, attack, containing", [
    ("fedavg", "sign-flip", BOTH), ("fedavg", "scale", BOTH),
    # half of HFedMoE's experts are uploaded by < 5 clients: floor(0.2 n) = 0, nothing is
    # trimmed there, and the attacker's flipped experts get through (weight 1/n)
    ("hfedmoe", "sign-flip", ("clip",))])
def test_an_attacker_hurts_the_undefended_run_and_the_defences_contain_it(
        tmp_path, honest, method, attack, containing):
    attacked = {"faults.attackers": str(ATTACKER), "faults.attack": attack,
                "faults.attack-scale": 10.0}
    effect = {name: _attack_effect(tmp_path, honest, method, name, **attacked)
              for name in DEFENCES}
    initial_loss, honest_loss = _test_loss(honest.out(method, "mean"))
    print(f"\n{method} {attack}: test loss initial {initial_loss:.4f}, honest "
          f"{honest_loss:.4f}; attacked: distance / honest progress (vs same aggregation, vs "
          "honest mean), loss: " +
          ", ".join(f"{name} {a:.3f} {b:.3f} {loss:.4f}" for name, (a, b, loss) in effect.items()))
    undefended, _, undefended_loss = effect["mean"]
    # the attack hurts: the undefended model ends farther from the honest one than the whole
    # honest training moved it, and its test loss ends above the initial model's
    assert undefended > 1.0 and undefended_loss > initial_loss > honest_loss
    for defence in BOTH:
        distance, _, loss = effect[defence]
        assert distance < undefended, defence  # every defence helps...
        if defence not in containing:
            continue
        assert distance < undefended / 2, defence  # ...these contain the attack
        assert loss < initial_loss, defence  # still learning
        assert abs(loss - honest_loss) < abs(undefended_loss - honest_loss) / 4, defence


def test_max_update_norm_rejects_a_scaling_attacker(tmp_path, honest):
    """Bound = 3x the largest honest update norm of round 1 (measured by running the real
    client round); the scaling attacker's update is 10x its honest one."""
    initial = honest.initial
    config = _config(tmp_path / "probe")
    norms = [update_norm(run_client_round(config, client, 1, initial).upload, initial)
             for client in range(5)]
    bound = 3 * max(norms)
    assert 10 * norms[ATTACKER] > bound  # the attacker is above the bound...
    attacked = {"faults.attackers": str(ATTACKER), "faults.attack": "scale",
                "faults.attack-scale": 10.0, "federation.max-update-norm": bound}
    distance, _, _ = _attack_effect(tmp_path / "bounded", honest, "fedavg", "mean", **attacked)
    rounds = read_metrics(tmp_path / "bounded" / "fedavg-mean")[1:]
    for record in rounds:  # ...and rejected every round, nobody else
        assert [f["client_id"] for f in record["failures"]] == [ATTACKER]
        assert "exceeds federation.max-update-norm" in record["failures"][0]["reason"]
        assert [c["client_id"] for c in record["clients"]] == [0, 1, 2, 3]
    undefended, _, _ = _attack_effect(tmp_path / "unbounded", honest, "fedavg", "mean",
                                      **{**attacked, "federation.max-update-norm": 0.0})
    print(f"max-update-norm: relative distance {distance:.3f} (undefended {undefended:.3f})")
    assert distance < undefended / 4


def test_injected_failures_through_the_client_app(tmp_path):
    """faults.client-failure-rate reaches the ClientApp: the drawn clients fail each round
    (error replies, recorded), the others are aggregated."""
    config = _config(tmp_path / "run", **{"faults.client-failure-rate": 0.4,
                                          "train.local-steps": 1})
    run_experiment(config)
    for record in read_metrics(tmp_path / "run")[1:]:
        failing = failing_clients(config.seed, record["round"], 5, 0.4)
        assert len(failing) == 2
        # in-process, node n + 1 holds partition n (a node's first reply names its client)
        assert sorted(f["node_id"] - 1 for f in record["failures"]) == sorted(failing)
        assert all(f["kind"] == "raised" and "injected failure" in f["reason"]
                   for f in record["failures"])
        assert sorted(c["client_id"] for c in record["clients"]) == \
            sorted(set(range(5)) - failing)
