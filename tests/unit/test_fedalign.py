"""FedAlign-MoE's mechanisms (hfedmoe.alignment) and the fedalign / hfedmoe-align methods,
each against an independent re-computation or a known method."""

import math
from dataclasses import replace

import pytest
import torch

from hfedmoe import alignment
from hfedmoe.aggregation import ClientUpdate
from hfedmoe.config import ConfigError, parse_run_config
from hfedmoe.model.adapter import MoEGeometry, RoutingTrace
from hfedmoe.strategies import client_routing_loss, method_for, server_guidance
from hfedmoe.strategies.fedalign import ROUTING_TARGET
from hfedmoe.training import sample_probabilities

L, S = 2, 3
GEOMETRY = MoEGeometry(num_layers=L, num_experts=S, top_k=2)


def _update(cid, n, usage, state, trained=None, importance=None, steps=2):
    return ClientUpdate(cid, n, state, usage, {"local-steps": steps}, importance=importance,
                        trained=trained if trained is not None
                        else torch.ones(L, S, dtype=torch.bool))


def _federation(num_clients=4, seed=0):
    """2 layers x 3 experts (two tensors each), routers (S, 4) with a bias (S,), a head."""
    g = torch.Generator().manual_seed(seed)
    global_state = {f"expert.{l}.{e}.{name}": torch.randn(shape, generator=g)
                    for l in range(L) for e in range(S) for name, shape in
                    (("up", (4, 2)), ("down", (2, 4)))}
    for l in range(L):
        global_state[f"router.{l}.weight"] = torch.randn(S, 4, generator=g)
        global_state[f"router.{l}.bias"] = torch.randn(S, generator=g)
    global_state["shared.head"] = torch.randn(5, generator=g)
    updates = []
    for cid in range(num_clients):
        trained = torch.rand(L, S, generator=g) < 0.8
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g)
                 for k, v in global_state.items()}
        updates.append(_update(cid, 5 + 7 * cid,
                               torch.softmax(3 * torch.randn(L, S, generator=g), dim=1),
                               state, trained, importance=torch.rand(L, S, generator=g)))
    return global_state, updates


# --- (a) the gate ---------------------------------------------------------------------------


def test_gate_row_weights_are_routing_mass_shares():
    _, updates = _federation()
    weights = alignment.gate_row_weights(updates)
    for l in range(L):
        for e in range(S):
            masses = [u.num_examples * float(u.usage[l, e]) for u in updates]
            for u, mass in zip(updates, masses):
                assert float(weights[u.client_id][l, e]) == pytest.approx(mass / sum(masses))


def test_gate_rows_are_averaged_with_their_own_weights():
    global_state, updates = _federation()
    routers = {k: v for k, v in global_state.items() if k.startswith("router.")}
    weights = alignment.gate_row_weights(updates)
    new = alignment.aggregate_gates_per_expert(routers, updates, weights)
    for key in routers:
        layer = int(key.split(".")[1])
        for e in range(S):
            expected = sum(float(weights[u.client_id][layer, e]) * u.state[key][e].double()
                           for u in updates)  # the weights of row e sum to 1
            assert torch.allclose(new[key][e].double(), expected, atol=1e-6), (key, e)


def test_a_row_nobody_routes_to_keeps_its_value_and_scalar_gates_use_layer_totals():
    usage_a = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    usage_b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    global_state = {"router.0.weight": torch.zeros(S, 2), "router.0.scale": torch.zeros(1)}
    updates = [_update(0, 10, usage_a, {"router.0.weight": torch.ones(S, 2),
                                        "router.0.scale": torch.ones(1)}),
               _update(1, 30, usage_b, {"router.0.weight": 3 * torch.ones(S, 2),
                                        "router.0.scale": 3 * torch.ones(1)})]
    new = alignment.aggregate_gates_per_expert(global_state, updates,
                                               alignment.gate_row_weights(updates))
    weight = new["router.0.weight"]
    assert torch.allclose(weight[0], torch.full((2,), (10 * 0.5 * 1 + 30 * 1.0 * 3) / 35))
    assert torch.allclose(weight[1], torch.ones(2))  # only client 0 routes to expert 1
    assert torch.equal(weight[2], torch.zeros(2))  # nobody: the global row
    # no expert axis: each client's row weights summed over the layer: 1/7 + 1 and 6/7 + 0
    expected = ((1 / 7 + 1) * 1 + (6 / 7) * 3) / 2
    assert float(new["router.0.scale"]) == pytest.approx(expected, rel=1e-6)


# --- (b) the routing regulariser ------------------------------------------------------------


def test_divergences_against_hand_computation_and_zero_at_the_target():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    q = torch.tensor([[0.4, 0.4, 0.2], [0.3, 0.3, 0.4]])
    kl = [sum(a * math.log(a / b) for a, b in zip(pr, qr)) for pr, qr in zip(p.tolist(), q.tolist())]
    assert float(alignment.routing_divergence(p, q, "kl")) == pytest.approx(sum(kl) / 2, rel=1e-5)

    def js(a, b):
        m = [(x + y) / 2 for x, y in zip(a, b)]
        return 0.5 * sum(x * math.log(x / z) for x, z in zip(a, m)) + \
            0.5 * sum(y * math.log(y / z) for y, z in zip(b, m))
    expected = sum(js(a, b) for a, b in zip(p.tolist(), q.tolist())) / 2
    assert float(alignment.routing_divergence(p, q, "js")) == pytest.approx(expected, rel=1e-5)
    for kind in ("kl", "js"):
        assert float(alignment.routing_divergence(q, q, kind)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="divergence"):
        alignment.routing_divergence(p, q, "l2")


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_a_gradient_step_on_the_regulariser_moves_routing_towards_the_target(kind):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]])
    before = alignment.routing_divergence(torch.softmax(logits, dim=1), target, kind)
    before.backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
        p0, p1 = torch.softmax(logits, dim=1), torch.softmax(stepped, dim=1)
        after = alignment.routing_divergence(p1, target, kind)
    assert float(after) < float(before.detach())
    assert float((p1 - target).abs().sum()) < float((p0 - target).abs().sum())


def test_batch_routing_distribution_is_usage_on_one_batch_and_keeps_the_graph():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # an all-padding row
    logits = torch.randn(L, 9, S, generator=g, requires_grad=True)
    trace = RoutingTrace([torch.softmax(logits[l], dim=1) for l in range(L)],
                         [torch.zeros(9, 2, dtype=torch.long)] * L)
    local = alignment.batch_routing_distribution(trace.probabilities, mask)
    expected = sample_probabilities(trace, mask).mean(dim=1)  # (L, S), u_c on this batch
    assert torch.allclose(local.detach(), expected, atol=1e-6)
    local.sum().backward()
    assert logits.grad is not None


def test_the_method_sends_the_pooled_usage_and_its_clients_regularise_towards_it():
    config = parse_run_config({"method": "fedalign", "fedalign.routing-weight": 0.3})
    method = method_for(config)
    _, updates = _federation()
    guidance = server_guidance(method, updates)
    pooled = sum(u.num_examples * u.usage for u in updates) / sum(u.num_examples for u in updates)
    assert torch.allclose(guidance[ROUTING_TARGET], pooled, atol=1e-6)
    loss = client_routing_loss(method, guidance, GEOMETRY)
    probs = [pooled[l].repeat(4, 1) for l in range(L)]  # every token routes like the target
    trace = RoutingTrace(probs, [torch.zeros(4, 2, dtype=torch.long)] * L)
    assert float(loss(trace, torch.ones(2, 2))) == pytest.approx(0.0, abs=1e-7)
    uniform = RoutingTrace([torch.full((4, S), 1 / S)] * L, trace.top_k_index)
    expected = 0.3 * alignment.routing_divergence(torch.full((L, S), 1 / S), pooled, "kl")
    assert float(loss(uniform, torch.ones(2, 2))) == pytest.approx(float(expected), rel=1e-5)
    # no target yet (round 1), the -no-reg ablation, other methods: no term
    assert client_routing_loss(method, {}, GEOMETRY) is None
    for name in ("fedalign-no-reg", "hfedmoe", "fedavg"):
        other = method_for(parse_run_config({"method": name}))
        assert client_routing_loss(other, guidance, GEOMETRY) is None
        assert name != "fedalign-no-reg" or server_guidance(other, updates) == {}
    with pytest.raises(ValueError, match="routing target"):
        client_routing_loss(method, {ROUTING_TARGET: torch.ones(L, S)}, GEOMETRY)


# --- (c) consistent experts -----------------------------------------------------------------


def test_a_sign_flipped_copy_is_excluded_and_the_rest_averaged():
    g = torch.Generator().manual_seed(3)
    global_state = {"expert.0.0.w": torch.randn(6, generator=g),
                    "expert.0.1.w": torch.randn(6, generator=g)}
    direction = torch.randn(6, generator=g)
    updates = []
    for cid, sign in enumerate([1, 1, 1, -1]):
        delta = sign * direction + 0.1 * torch.randn(6, generator=g)
        state = {"expert.0.0.w": global_state["expert.0.0.w"] + delta,
                 "expert.0.1.w": global_state["expert.0.1.w"] + torch.randn(6, generator=g)}
        updates.append(ClientUpdate(cid, 10 * (cid + 1), state, torch.ones(1, 2) / 2, {}))
    holders = {u.client_id: torch.ones(1, 2, dtype=torch.bool) for u in updates}
    new, diagnostics = alignment.aggregate_consistent_experts(global_state, updates, holders, 0.5)
    assert [1 for l, e, c in diagnostics["excluded"] if (l, e) == (0, 0)] == [1]
    assert [0, 0, 3] in diagnostics["excluded"]
    kept = updates[:3]
    expected = sum(u.num_examples * u.state["expert.0.0.w"] for u in kept) / sum(
        u.num_examples for u in kept)
    assert torch.allclose(new["expert.0.0.w"], expected, atol=1e-6)
    # consistency off: every holder averaged
    plain, diagnostics = alignment.aggregate_consistent_experts(global_state, updates, holders,
                                                                0.5, consistency=False)
    assert diagnostics["excluded"] == []
    expected = sum(u.num_examples * u.state["expert.0.0.w"] for u in updates) / 100
    assert torch.allclose(plain["expert.0.0.w"], expected, atol=1e-6)
    # hfedmoe-align with hfedmoe.expert-step = "data-share": from g towards the consistent
    # holders' mean by their share of the round's examples (60 of 100 for expert (0, 0))
    damped, _ = alignment.aggregate_consistent_experts(global_state, updates, holders, 0.5,
                                                       step="data-share")
    g = global_state["expert.0.0.w"]
    mean = sum(u.num_examples * u.state["expert.0.0.w"] for u in kept) / 60
    assert torch.allclose(damped["expert.0.0.w"], g + 0.6 * (mean - g), atol=1e-6)
    with pytest.raises(ValueError, match="expert step 'half'"):
        alignment.aggregate_consistent_experts(global_state, updates, holders, 0.5, step="half")


def test_threshold_hand_computed_and_degenerate_cases():
    # similarities of u, u, u, -u: kappa = 1/3, 1/3, 1/3, -1; pairs mean 0, std 1
    sim = torch.tensor([[1.0, 1, 1, -1], [1, 1, 1, -1], [1, 1, 1, -1], [-1, -1, -1, 1]])
    assert alignment.consistent_holders(sim, 0.5).tolist() == [True, True, True, False]
    assert alignment.consistent_holders(sim, 1.0).tolist() == [True] * 4  # tau = -1 <= -1
    two = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert alignment.consistent_holders(two, 0.5).tolist() == [True, True]
    directions = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    cos = alignment.pairwise_cosine(directions)
    assert cos[0, 1] == 0 and cos[0, 2] == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="beta"):
        alignment.consistent_holders(sim, -1.0)


def test_the_floor_keeps_an_agreeing_copy_the_relative_threshold_leaves_out():
    # u, u, u and v with cos(u, v) = 0.5: kappa_u = (1 + 1 + 0.5) / 3 = 5/6, kappa_v = 0.5;
    # pairs 1, 1, 1, 0.5, 0.5, 0.5: mean 0.75, std 0.25, tau(beta 0.5) = 0.625 > kappa_v
    sim = torch.full((4, 4), 1.0)
    sim[3, :3] = sim[:3, 3] = 0.5
    assert alignment.consistent_holders(sim, 0.5).tolist() == [True, True, True, False]
    assert alignment.consistent_holders(sim, 0.5, floor=1.0).tolist() == [True] * 3 + [False]
    assert alignment.consistent_holders(sim, 0.5, floor=0.5).tolist() == [True] * 4
    assert alignment.consistent_holders(sim, 0.5, floor=0.51).tolist() == [True] * 3 + [False]
    # a copy pointing away (kappa -1) stays out under a floor of 0
    flipped = torch.tensor([[1.0, 1, 1, -1], [1, 1, 1, -1], [1, 1, 1, -1], [-1, -1, -1, 1]])
    assert alignment.consistent_holders(flipped, 0.5, floor=0.0).tolist() == [True] * 3 + [False]
    with pytest.raises(ValueError, match="floor"):
        alignment.consistent_holders(sim, 0.5, floor=1.5)
    # through the configuration to the server's aggregation: directions with those cosines
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])  # cos(u, v) = 0.5
    global_state = {"expert.0.0.w": torch.zeros(2)}
    updates = [ClientUpdate(c, 10, {"expert.0.0.w": d}, torch.ones(1, 1), {})
               for c, d in enumerate([u, u, u, v])]
    for floor, excluded, expected in ((1.0, [[0, 0, 3]], u), (0.0, [], (3 * u + v) / 4)):
        method = method_for(parse_run_config({"method": "fedalign-no-reg",
                                              "fedalign.consistency-floor": floor}))
        new, diagnostics = replace(method, gate=False).aggregate(global_state, updates)
        assert diagnostics["excluded"] == excluded
        assert torch.allclose(new["expert.0.0.w"], expected, atol=1e-6)


def test_an_expert_without_holders_keeps_its_value():
    global_state, updates = _federation()
    nobody = {u.client_id: torch.zeros(L, S, dtype=torch.bool) for u in updates}
    experts = {k: v for k, v in global_state.items() if k.startswith("expert.")}
    new, diagnostics = alignment.aggregate_consistent_experts(experts, updates, nobody, 0.5)
    assert all(torch.equal(new[k], experts[k]) for k in experts)
    assert diagnostics["experts_aggregated"] == 0


# --- the methods ----------------------------------------------------------------------------


def test_fedalign_experts_come_from_the_clients_that_trained_them():
    global_state, updates = _federation()
    method = method_for(parse_run_config({"method": "fedalign-no-consistency"}))
    new, _ = method.aggregate(global_state, updates)
    for l in range(L):
        for e in range(S):
            holders = [u for u in updates if bool(u.trained[l, e])]
            key = f"expert.{l}.{e}.up"
            expected = (sum(u.num_examples * u.state[key] for u in holders)
                        / sum(u.num_examples for u in holders)) if holders else global_state[key]
            assert torch.allclose(new[key], expected, atol=1e-6)


def test_hfedmoe_align_with_every_mechanism_off_is_hfedmoe():
    global_state, updates = _federation()
    for u in updates:  # HFedMoE's uploads: trained experts in S_c only
        keep = u.trained & (u.usage >= 0.05)
        for key in list(u.state):
            if key.startswith("expert.") and not bool(keep[int(key[7]), int(key[9])]):
                del u.state[key]
    config = parse_run_config({"method": "hfedmoe-align"})
    align = method_for(config)
    off = replace(align, gate=False, consistency=False, routing_weight=0.0)
    hfedmoe = method_for(parse_run_config({"method": "hfedmoe"}))
    ours, _ = off.aggregate(global_state, updates)
    theirs, _ = hfedmoe.aggregate(global_state, updates)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in global_state)
    assert client_routing_loss(off, {ROUTING_TARGET: torch.full((L, S), 1 / S)}, GEOMETRY) is None
    # and the client side is HFedMoE's: the same selector type and sparse upload
    assert type(align.selector(4, GEOMETRY, 0)) is type(hfedmoe.selector(4, GEOMETRY, 0))
    # with the mechanisms on, the result differs (they do something)
    on, _ = align.aggregate(global_state, updates)
    assert not all(torch.allclose(on[k], theirs[k], atol=1e-6) for k in global_state)
    # hfedmoe.expert-step = "data-share" reaches the consistent aggregation: with a threshold
    # that keeps every holder it is hfedmoe-data-share's step exactly
    shared = parse_run_config({"method": "hfedmoe-align", "hfedmoe.expert-step": "data-share",
                               "fedalign.consistency-beta": 1e9})
    keep_all = replace(method_for(shared), gate=False, routing_weight=0.0)
    damped = method_for(parse_run_config({"method": "hfedmoe-data-share"}))
    ours, _ = keep_all.aggregate(global_state, updates)
    theirs, _ = damped.aggregate(global_state, updates)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in global_state)
    plain, _ = off.aggregate(global_state, updates)
    assert not all(torch.allclose(ours[k], plain[k], atol=1e-6) for k in global_state)


def test_configuration_checks():
    with pytest.raises(ConfigError, match="robust.aggregation"):
        parse_run_config({"method": "hfedmoe-align", "robust.aggregation": "trimmed-mean"})
    with pytest.raises(ConfigError, match="fedalign.divergence"):
        parse_run_config({"fedalign.divergence": "l1"})
    with pytest.raises(ConfigError, match="fedalign.routing-weight"):
        parse_run_config({"fedalign.routing-weight": -0.1})
    with pytest.raises(ConfigError, match="fedalign.consistency-beta"):
        parse_run_config({"fedalign.consistency-beta": float("nan")})
    with pytest.raises(ConfigError, match="fedalign.consistency-floor"):
        parse_run_config({"fedalign.consistency-floor": -1.5})
    parse_run_config({"method": "fedalign", "robust.aggregation": "clip"})  # allowed
