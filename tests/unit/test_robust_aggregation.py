"""Robust aggregation (hfedmoe.robust): hand-computed examples, independent re-computation,
and the degenerate cases that must give the method's own aggregate exactly."""

import statistics

import pytest
import torch

from hfedmoe import robust
from hfedmoe.aggregation import ClientUpdate, dominant_experts, fedavg, gate_weights
from hfedmoe.config import ALIGNING_METHODS, METHODS, SPLIT_METHODS, parse_run_config
from hfedmoe.strategies import PlanningMethod, method_for
from hfedmoe.strategies.fedavg import FedAvgMethod
from hfedmoe.strategies.hfedmoe import HFedMoEMethod
from hfedmoe.strategies.robust import RobustMethod

TAU = 0.05


def _update(cid, state, n=10, trained=None, usage=None, importance=None):
    usage = usage if usage is not None else torch.full((2, 2), 0.5)
    return ClientUpdate(cid, n, state, usage, {}, importance, trained)


def _federation(num_clients=5, seed=0):
    """Global state of 2 layers x 2 experts + routers + head; every client trains expert
    (0, 0), clients 0-1 also (1, 1); usage/importance random (rows of usage sum to 1)."""
    g = torch.Generator().manual_seed(seed)
    global_state = {f"expert.{l}.{e}.w": torch.randn(3, generator=g)
                    for l in range(2) for e in range(2)}
    global_state.update({f"router.{l}.weight": torch.randn(2, 4, generator=g) for l in range(2)})
    global_state["shared.head"] = torch.randn(5, generator=g)
    updates = []
    for cid in range(num_clients):
        trained = torch.tensor([[True, False], [False, cid < 2]])
        state = {k: v + torch.randn(v.shape, generator=g) for k, v in global_state.items()
                 if not k.startswith("expert.") or bool(trained[int(k[7]), int(k[9])])}
        updates.append(_update(cid, state, n=5 + 7 * cid, trained=trained,
                               usage=torch.softmax(torch.randn(2, 2, generator=g), dim=1),
                               importance=torch.rand(2, 2, generator=g)))
    return global_state, updates


def test_groups():
    assert robust.group_of("expert.1.3.down") == ("expert", 1, 3)
    assert robust.group_of("expert.1.3.up") == ("expert", 1, 3)
    assert robust.group_of("router.0.weight") == ("router", 0)
    assert robust.group_of("shared.classifier.weight") == ("shared",)


def test_clip_by_median_of_the_contributors_hand_computed():
    global_state = {"expert.0.0.a": torch.zeros(2), "expert.0.0.b": torch.zeros(1)}
    trained = torch.tensor([[True]])
    updates = [  # delta norms of group expert (0, 0): 5, 1, 3; client 3 uploads it untrained
        _update(0, {"expert.0.0.a": torch.tensor([3.0, 0.0]), "expert.0.0.b": torch.tensor([4.0])},
                trained=trained),
        _update(1, {"expert.0.0.a": torch.tensor([0.0, 1.0])}, trained=trained),
        _update(2, {"expert.0.0.b": torch.tensor([-3.0])}, trained=trained),
        _update(3, {"expert.0.0.a": torch.zeros(2)}, trained=torch.tensor([[False]])),
    ]
    clipped, counts = robust.clip_deltas(global_state, updates, clip_norm=0.0)
    # median over the 3 clients that trained it = 3 (client 3's zero delta does not count)
    assert torch.allclose(clipped[0].state["expert.0.0.a"], torch.tensor([1.8, 0.0]))
    assert torch.allclose(clipped[0].state["expert.0.0.b"], torch.tensor([2.4]))
    for before, after in zip(updates[1:], clipped[1:]):
        assert all(after.state[k] is before.state[k] for k in before.state)  # untouched
    assert counts == {0: 1, 1: 0, 2: 0, 3: 0}
    clipped, counts = robust.clip_deltas(global_state, updates, clip_norm=2.0)
    assert torch.allclose(clipped[0].state["expert.0.0.a"], torch.tensor([1.2, 0.0]))
    assert torch.allclose(clipped[2].state["expert.0.0.b"], torch.tensor([-2.0]))
    assert counts == {0: 1, 1: 0, 2: 1, 3: 0}


def test_clip_bounds_every_group_separately():
    global_state, updates = _federation()
    clipped, _ = robust.clip_deltas(global_state, updates, clip_norm=0.0)
    before = [robust.delta_norms(global_state, u.state) for u in updates]
    after = [robust.delta_norms(global_state, u.state) for u in clipped]
    for group in before[0]:
        norms = [b[group] for b in before if group in b]
        median = statistics.median(norms)
        for b, a in zip(before, after):
            if group in b:
                assert a[group] == pytest.approx(min(b[group], median), rel=1e-5)


def _trimmed_reference(values, weights, trim):
    """Independent: per coordinate, a Python sort of (value, client) pairs."""
    n, flat = len(values), [v.reshape(-1).tolist() for v in values]
    out = []
    for j in range(len(flat[0])):
        kept = sorted(range(n), key=lambda i: (flat[i][j], i))[trim:n - trim]
        out.append(sum(weights[i] * flat[i][j] for i in kept) / sum(weights[i] for i in kept))
    return torch.tensor(out, dtype=torch.float64).reshape(values[0].shape)


def test_weighted_trimmed_mean_hand_computed():
    values = torch.tensor([[1.0, 10.0], [2.0, -4.0], [3.0, 0.0], [100.0, 1.0]])
    plain = robust.weighted_trimmed_mean(values, torch.ones(4), trim=1)
    assert torch.allclose(plain, torch.tensor([2.5, 0.5]))  # (2+3)/2, (0+1)/2
    weighted = robust.weighted_trimmed_mean(values, torch.tensor([1.0, 3.0, 1.0, 1.0]), trim=1)
    assert torch.allclose(weighted, torch.tensor([(2 * 3 + 3) / 4, (0 + 1) / 2]))
    assert torch.allclose(robust.weighted_trimmed_mean(values, torch.ones(4), trim=0),
                          values.mean(dim=0))
    with pytest.raises(ValueError):
        robust.weighted_trimmed_mean(values, torch.ones(4), trim=2)


def test_weighted_trimmed_mean_matches_a_reference():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(7, 4, 3, generator=g, dtype=torch.float64)
    weights = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    for trim in range(4):
        assert torch.allclose(robust.weighted_trimmed_mean(values, weights, trim),
                              _trimmed_reference(list(values), weights.tolist(), trim))


def test_method_weights_are_the_methods_own():
    global_state, updates = _federation()
    hfedmoe = HFedMoEMethod(0.5, 0.1, TAU)
    weights = robust.method_weights(hfedmoe.aggregate, global_state, updates,
                                    hfedmoe.aggregate(global_state, updates)[0])
    dominant = {u.client_id: dominant_experts(u.usage, TAU) for u in updates}
    alpha = gate_weights({u.client_id: u.usage for u in updates},
                         {u.client_id: u.importance for u in updates}, dominant)
    expected_router = torch.tensor([alpha[u.client_id] for u in updates], dtype=torch.float64)
    assert torch.allclose(weights["router.0.weight"], expected_router)
    sizes = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    assert torch.allclose(weights["shared.head"], sizes / sizes.sum())
    expert = torch.tensor([u.num_examples * float(dominant[u.client_id][0, 0])
                           for u in updates], dtype=torch.float64)  # Eq. 17, all trained (0, 0)
    assert torch.allclose(weights["expert.0.0.w"], expert / expert.sum())
    assert float(weights["expert.0.1.w"].sum()) == 0.0  # nobody uploaded it


def test_a_method_that_is_not_a_weighted_mean_is_refused():
    global_state, updates = _federation()

    def median(state, ups):
        return {k: torch.stack([u.state[k] for u in ups if k in u.state] or [v]).median(0).values
                for k, v in state.items()}, {}

    with pytest.raises(ValueError, match="not a weighted mean"):
        robust.method_weights(median, global_state, updates,
                              median(global_state, updates)[0])


@pytest.mark.parametrize("method", [FedAvgMethod(), HFedMoEMethod(0.5, 0.1, TAU)],
                         ids=["fedavg", "hfedmoe"])
def test_degenerate_cases_equal_the_method_exactly(method):
    global_state, updates = _federation()
    plain, _ = method.aggregate(global_state, updates)
    for wrapped in (RobustMethod(method, "trimmed-mean", trim_fraction=0.0),
                    RobustMethod(method, "trimmed-mean", trim_fraction=0.19),  # 5 * .19 < 1
                    RobustMethod(method, "clip", clip_norm=1e9)):
        state, diagnostics = wrapped.aggregate(global_state, updates)
        assert all(torch.equal(state[k], plain[k]) for k in plain), wrapped
        assert "robust" in diagnostics


def test_trimmed_mean_per_key_over_the_methods_contributors():
    global_state, updates = _federation()
    method = FedAvgMethod()
    state, diagnostics = RobustMethod(method, "trimmed-mean", trim_fraction=0.2
                                             ).aggregate(global_state, updates)
    sizes = [float(u.num_examples) for u in updates]
    # expert (0, 0): 5 contributors, trim 1 at each end
    expected = _trimmed_reference([u.state["expert.0.0.w"].double() for u in updates], sizes, 1)
    assert torch.allclose(state["expert.0.0.w"].double(), expected, atol=1e-6)
    # expert (1, 1): trained by 2 clients -> floor(0.2 * 2) = 0: plain FedAvg of the two
    assert torch.equal(state["expert.1.1.w"], fedavg(global_state, updates)["expert.1.1.w"])
    assert torch.equal(state["expert.0.1.w"], global_state["expert.0.1.w"])  # nobody
    expected = _trimmed_reference([u.state["router.1.weight"].double() for u in updates], sizes, 1)
    assert torch.allclose(state["router.1.weight"].double(), expected, atol=1e-6)
    assert diagnostics["robust"]["trimmed_keys"] == 4  # expert (0,0), 2 routers, head


def test_trimmed_mean_keeps_hfedmoe_gate_weights_among_the_survivors():
    global_state, updates = _federation()
    method = HFedMoEMethod(0.5, 0.1, TAU)
    state, _ = RobustMethod(method, "trimmed-mean", trim_fraction=0.2
                                   ).aggregate(global_state, updates)
    dominant = {u.client_id: dominant_experts(u.usage, TAU) for u in updates}
    alpha = gate_weights({u.client_id: u.usage for u in updates},
                         {u.client_id: u.importance for u in updates}, dominant)
    contributors = [u for u in updates if alpha[u.client_id] > 0]
    trim = int(0.2 * len(contributors))
    expected = _trimmed_reference([u.state["router.0.weight"].double() for u in contributors],
                                  [alpha[u.client_id] for u in contributors], trim)
    assert torch.allclose(state["router.0.weight"].double(), expected, atol=1e-6)


def test_trimmed_mean_with_the_data_share_step_moves_by_the_holders_share():
    """expert-step = data-share leaves weight on the global value: the trimmed mean over the
    holders, approached by the holders' share of the round's examples."""
    global_state, updates = _federation(num_clients=8)
    tau = 0.3  # usage of expert (0, 0): 0.23 and 0.27 for two clients, 0.46-0.67 for six
    method = HFedMoEMethod(0.5, 0.1, tau, expert_step="data-share")
    state, _ = RobustMethod(method, "trimmed-mean", trim_fraction=0.2
                            ).aggregate(global_state, updates)
    holders = [u for u in updates if bool(dominant_experts(u.usage, tau)[0, 0])]
    assert len(holders) == 6  # trim 1 at each end; 2 trained it but are not holders
    sizes = [float(u.num_examples) for u in holders]
    share = sum(sizes) / sum(u.num_examples for u in updates)
    trimmed = _trimmed_reference([u.state["expert.0.0.w"].double() for u in holders], sizes,
                                 int(0.2 * len(holders)))
    g = global_state["expert.0.0.w"].double()
    assert torch.allclose(state["expert.0.0.w"].double(), g + share * (trimmed - g), atol=1e-6)


def test_trimmed_mean_removes_an_attacker_that_the_mean_follows():
    global_state, updates = _federation()
    attacker = updates[4]
    flipped = {k: global_state[k] - 10 * (v - global_state[k]) for k, v in attacker.state.items()}
    updates[4] = _update(4, flipped, attacker.num_examples, attacker.trained, attacker.usage,
                         attacker.importance)
    honest, _ = FedAvgMethod().aggregate(global_state, updates[:4])
    plain, _ = FedAvgMethod().aggregate(global_state, updates)
    trimmed, _ = RobustMethod(FedAvgMethod(), "trimmed-mean", trim_fraction=0.2
                                     ).aggregate(global_state, updates)
    clipped, _ = RobustMethod(FedAvgMethod(), "clip").aggregate(global_state, updates)

    def distance(state):
        return sum(float((state[k] - honest[k]).norm()) for k in ("expert.0.0.w", "shared.head"))

    assert distance(trimmed) < distance(plain) / 3
    assert distance(clipped) < distance(plain) / 3


def test_method_for_applies_the_wrapper_and_keeps_the_client_side():
    mean = method_for(parse_run_config({"method": "fedavg"}))
    assert isinstance(mean, FedAvgMethod)  # "mean": the method itself
    clipped = method_for(parse_run_config({"method": "hfedmoe", "robust.aggregation": "clip"}))
    assert isinstance(clipped, RobustMethod) and clipped.name == "hfedmoe"
    flex = method_for(parse_run_config({"method": "flex",
                                        "robust.aggregation": "trimmed-mean"}))
    assert isinstance(flex, PlanningMethod) and flex.name == "flex"


@pytest.mark.parametrize("name", [m for m in METHODS if m not in ALIGNING_METHODS
                                  and m not in SPLIT_METHODS])  # split: robust.aggregation = mean
def test_every_method_is_a_weighted_mean_so_trimmed_mean_applies(name):
    """The contract robust.trimmed-mean relies on holds for every registered method but the
    FedAlign ones (whose configuration refuses trimmed-mean, tests/unit/test_fedalign): its
    probed weights reproduce its own aggregate (method_weights raises otherwise)."""
    global_state, updates = _federation()
    method = method_for(parse_run_config({"method": name, "robust.aggregation": "trimmed-mean",
                                          "robust.trim-fraction": 0.0}))
    plain, _ = method.inner.aggregate(global_state, updates)
    state, _ = method.aggregate(global_state, updates)  # trim 0: the method's own, exactly
    assert all(torch.equal(state[k], plain[k]) for k in plain)
