"""Per-expert LoRA (hfedmoe.model.lora) against independent re-computations: the update is
(alpha / r)·B·A on each expert's own weights, B starts at zero, every process builds the same
factors, only active experts' factors learn, the grouped kernel agrees with the per-expert one
and with merged weights, and LoRA's backward costs less than training the weights."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.bench import count_step
from hfedmoe.config import ConfigError, parse_run_config
from hfedmoe.model import load_adapter
from hfedmoe.model.lora import LoRASettings
from hfedmoe.model.sparse_experts import run_group
from hfedmoe.model.state import set_trainable
from hfedmoe.strategies import method_for

SETTINGS = LoRASettings(rank=4, alpha=8.0, dropout=0.0)


def _adapter(family: str = "qwen2_moe", lora: LoRASettings | None = SETTINGS, seed: int = 0):
    config = parse_run_config({"model.name": f"tiny:{family}"})
    adapter = load_adapter(config.model, num_labels=3, seed=0)
    if lora is not None:
        adapter.attach_lora(lora, seed)
    return adapter


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (4, 16), generator=g),
            "attention_mask": torch.ones(4, 16, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,), generator=g)}


def _logits(adapter, batch):
    adapter.model.eval()
    with torch.no_grad():
        return adapter.model(batch["input_ids"], batch["attention_mask"])


def _randomise_b(adapter, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bank in adapter.banks:
            for expert in bank.experts:
                for factors in expert.lora.values():
                    factors.B.copy_(torch.randn(factors.B.shape, generator=g) * 0.05)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_factors_start_as_the_base_model_and_every_process_builds_the_same(family):
    base, one, two = _adapter(family, None), _adapter(family), _adapter(family)
    batch = _batch()
    assert torch.equal(_logits(base, batch), _logits(one, batch))  # B = 0: ΔW = 0
    a_one = one.expert_parameters(0, 0)["lora.gate_up_proj.A"]
    assert torch.equal(a_one, two.expert_parameters(0, 0)["lora.gate_up_proj.A"])
    assert not torch.equal(a_one, one.expert_parameters(0, 1)["lora.gate_up_proj.A"])
    assert not torch.equal(a_one, _adapter(family, seed=1).expert_parameters(0, 0)[
        "lora.gate_up_proj.A"])  # another run seed, other factors
    names = set(one.expert_parameters(0, 0))
    assert names == {"lora.gate_up_proj.A", "lora.gate_up_proj.B", "lora.down_proj.A",
                     "lora.down_proj.B"}
    shapes = {n: tuple(p.shape) for n, p in one.expert_parameters(0, 0).items()}
    expert = one.banks[0].experts[0]
    (two_i, hidden), (_, inter) = expert.gate_up_proj.shape, expert.down_proj.shape
    assert shapes == {"lora.gate_up_proj.A": (4, hidden), "lora.gate_up_proj.B": (two_i, 4),
                      "lora.down_proj.A": (4, inter), "lora.down_proj.B": (hidden, 4)}


@pytest.mark.parametrize("rank", [4, 3])  # 3: rows of the (n, r) product unaligned for grouped_mm
def test_grouped_and_per_expert_kernels_agree_with_merged_weights(rank):
    settings = LoRASettings(rank=rank, alpha=8.0, dropout=0.0)
    adapter = _adapter(lora=settings)
    _randomise_b(adapter)
    experts = list(adapter.banks[0].experts)[:3]
    hidden = experts[0].gate_up_proj.shape[1]
    sizes = [5, 0, 7]
    x = torch.randn(sum(sizes), hidden, generator=torch.Generator().manual_seed(2))
    grouped = run_group([experts[0], experts[1], experts[2]], x, sizes)
    per_expert = torch.cat([e(part) for e, part in zip(experts, x.split(sizes))])
    # independent: each expert with W + (alpha / r)·B·A as plain weights
    reference = []
    for e, part in zip(experts, x.split(sizes)):
        gate_up = e.gate_up_proj + settings.scaling * e.lora["gate_up_proj"].B @ e.lora[
            "gate_up_proj"].A
        down = e.down_proj + settings.scaling * e.lora["down_proj"].B @ e.lora["down_proj"].A
        gate, up = torch.nn.functional.linear(part, gate_up).chunk(2, dim=-1)
        reference.append(torch.nn.functional.linear(e.act_fn(gate) * up, down))
    reference = torch.cat(reference)
    assert torch.allclose(grouped, reference, atol=1e-5)
    assert torch.allclose(per_expert, reference, atol=1e-5)


def test_dense_act_experts_take_factors_on_up_and_down():
    from hfedmoe.model.upcycle import DenseActExpert

    torch.manual_seed(0)
    experts = [DenseActExpert(8, 12, "gelu") for _ in range(2)]
    for index, expert in enumerate(experts):
        from hfedmoe.model.lora import attach_factors

        attach_factors(expert, SETTINGS, seed=0, layer=0, index=index)
        with torch.no_grad():
            for factors in expert.lora.values():
                factors.B.normal_(0, 0.1)
    x = torch.randn(7, 8)
    sizes = [3, 4]
    grouped = run_group(experts, x, sizes)
    reference = []
    for e, part in zip(experts, x.split(sizes)):
        up = e.up.weight + SETTINGS.scaling * e.lora["up"].B @ e.lora["up"].A
        down = e.down.weight + SETTINGS.scaling * e.lora["down"].B @ e.lora["down"].A
        reference.append(torch.nn.functional.linear(
            e.act(torch.nn.functional.linear(part, up, e.up.bias)), down))
    assert torch.allclose(grouped, torch.cat(reference), atol=1e-5)


def test_only_the_active_experts_factors_learn_and_the_base_weights_stay_frozen():
    adapter = _adapter()
    params = set_trainable(adapter, "head")
    assert not any("gate_up_proj" == k.rsplit(".", 1)[-1] for k in params)  # no base weight
    base = {id(p): p.detach().clone() for bank in adapter.banks for e in bank.experts
            for p in (e.gate_up_proj, e.down_proj)}
    S = adapter.geometry.num_experts
    active = torch.zeros(S, dtype=torch.bool)
    active[:2] = True
    adapter.model.train()
    batch = _batch()
    with adapter.trace_routing() as trace, adapter.budgeted_experts(lambda layer: active):
        logits = adapter.model(batch["input_ids"], batch["attention_mask"])
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    routed = set(torch.unique(trace.top_k_index[0]).tolist())
    for e in range(S):
        factors = adapter.expert_parameters(0, e)
        learned = factors["lora.gate_up_proj.A"].grad is not None
        # B = 0 at the start, so A's gradient is zero but present; B's is not zero
        assert learned == (e < 2 and e in routed), e
        if learned:
            assert factors["lora.down_proj.B"].grad.abs().sum() > 0
    for bank in adapter.banks:
        for expert in bank.experts:
            for p in (expert.gate_up_proj, expert.down_proj):
                assert p.grad is None and not p.requires_grad and torch.equal(p, base[id(p)])


def test_lora_backward_costs_less_than_training_the_weights_and_shrinks_with_the_budget():
    config = parse_run_config({"model.name": "tiny:qwen2_moe", "method": "hfedmoe"})
    full = _adapter(lora=None)
    lora = _adapter()
    batch = _batch()
    total = full.geometry.total_experts
    full_step = count_step(full, list(set_trainable(full, "head").values()), batch, None,
                           total, "one-pass")
    lora_params = list(set_trainable(lora, "head").values())
    lora_step = count_step(lora, lora_params, batch, None, total, "one-pass")
    assert lora_step.backward_flops < full_step.backward_flops
    assert lora_step.trainable_state_bytes < 0.5 * full_step.trainable_state_bytes
    method = method_for(config)
    by_budget = [count_step(lora, lora_params, batch, method.selector(b, lora.geometry, seed=0),
                            b, "one-pass").backward_flops for b in (2, 8)]
    assert by_budget[0] < by_budget[1] <= lora_step.backward_flops


def test_merging_keeps_the_outputs_and_leaves_a_plain_model():
    adapter = _adapter()
    _randomise_b(adapter)
    batch = _batch()
    before = _logits(adapter, batch)
    adapter.merge_lora()
    assert torch.allclose(_logits(adapter, batch), before, atol=1e-5)
    assert set(adapter.expert_parameters(0, 0)) == {"gate_up_proj", "down_proj"}
    assert not torch.allclose(before, _logits(_adapter(lora=None), batch), atol=1e-5)


def test_switch_experts_take_factors_run_grouped_merge_and_quantize():
    """SwitchTransformers' T5 experts (wo(dropout(act(wi x)))) as SwitchExpert: the grouped
    kernel equals W + (alpha / r)·B·A written out, B = 0 is the base model, merging keeps the
    logits, and an nf4 base stays within the quantization's tolerance."""
    from hfedmoe.model.switch import SwitchExpert

    base, adapter = _adapter("switch_transformers", None), _adapter("switch_transformers")
    batch = _batch()
    assert torch.equal(_logits(base, batch), _logits(adapter, batch))  # B = 0
    assert set(adapter.expert_parameters(0, 0)) == {"lora.wi.A", "lora.wi.B", "lora.wo.A",
                                                    "lora.wo.B"}
    _randomise_b(adapter)
    experts = list(adapter.banks[0].experts)[:3]
    assert all(type(e) is SwitchExpert for e in experts)
    sizes = [4, 0, 6]
    x = torch.randn(sum(sizes), experts[0].wi.weight.shape[1],
                    generator=torch.Generator().manual_seed(2))
    reference = []
    for e, part in zip(experts, x.split(sizes)):
        wi = e.wi.weight + SETTINGS.scaling * e.lora["wi"].B @ e.lora["wi"].A
        wo = e.wo.weight + SETTINGS.scaling * e.lora["wo"].B @ e.lora["wo"].A
        reference.append(torch.nn.functional.linear(e.act(part @ wi.T), wo))
    assert torch.allclose(run_group(experts, x, sizes), torch.cat(reference), atol=1e-5)
    before = _logits(adapter, batch)
    assert not torch.allclose(before, _logits(base, batch), atol=1e-4)
    adapter.merge_lora()
    assert torch.allclose(_logits(adapter, batch), before, atol=1e-5)
    quantized = _adapter("switch_transformers")
    quantized.quantize_experts("nf4")
    error = (_logits(quantized, batch) - _logits(base, batch)).abs().max()
    assert 0 < error < 0.05 * _logits(base, batch).abs().max()


def test_bad_lora_settings_name_the_key():
    for key, value in (("lora.rank", 0), ("lora.dropout", 1.0), ("lora.alpha", -1.0),
                       ("train.adapter", "qlora")):
        with pytest.raises(ConfigError, match=key):
            parse_run_config({key: value})


def test_the_cost_model_charges_the_factors_as_the_trainable_state():
    from hfedmoe.costs import training_costs

    config = parse_run_config({"model.name": "tiny:qwen2_moe"})
    full_cost, full_base = training_costs(_adapter(lora=None), config)
    lora = _adapter()
    lora_cost, lora_base = training_costs(lora, config)
    factor_bytes = sum(p.numel() * 4 for p in lora.expert_parameters(0, 0).values())
    assert lora_cost.grad_bytes == factor_bytes and lora_cost.optimizer_bytes == 2 * factor_bytes
    assert factor_bytes < full_cost.grad_bytes
    # the expert's activations follow its size, which LoRA does not change, plus the
    # factors' inner products: r floats per routed token per projection
    g = lora.geometry
    routed = -(-config.train.batch_size * config.model.max_length * g.top_k // g.num_experts)
    assert (lora_cost.activation_bytes - full_cost.activation_bytes
            == 4 * routed * SETTINGS.rank * 2)
    assert lora_base == full_base + sum(p.numel() * 4 for layer in range(g.num_layers)
                                        for e in range(g.num_experts)
                                        for p in lora.expert_parameters(layer, e).values())


@pytest.mark.parametrize("aggregation", ["factors", "frozen-a"])
def test_frozen_a_averages_the_updates_exactly_and_the_factor_average_does_not(aggregation):
    """Two clients' trained factors of one expert, aggregated by the real FedAvg fold with
    equal weights; the merged update is compared with the mean of the clients' own ΔW."""
    from hfedmoe.aggregation import ClientUpdate, fedavg_aggregation, fold
    from hfedmoe.model.state import read_state

    config = parse_run_config({"model.name": "tiny:qwen2_moe", "train.adapter": "lora",
                               "lora.aggregation": aggregation})
    settings = config.lora.settings()
    clients = [_adapter(lora=settings) for _ in range(2)]
    server = _adapter(lora=settings)
    params = [set_trainable(a, "head") for a in clients]
    names = set(clients[0].expert_parameters(0, 0))
    assert names == ({"lora.gate_up_proj.B", "lora.down_proj.B"} if aggregation == "frozen-a"
                     else {"lora.gate_up_proj.A", "lora.gate_up_proj.B", "lora.down_proj.A",
                           "lora.down_proj.B"})
    for seed, trainable in enumerate(params):  # each client's own "training": other values
        g = torch.Generator().manual_seed(10 + seed)
        with torch.no_grad():
            for p in trainable.values():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    states = [read_state(p) for p in params]
    usage = torch.zeros(2, 8)
    updates = [ClientUpdate(c, 10, state, usage, {}) for c, state in enumerate(states)]
    global_state = read_state(set_trainable(server, "head"))
    new_state, _ = fold(fedavg_aggregation(global_state), updates)
    server_params = set_trainable(server, "head")
    with torch.no_grad():
        for key, value in new_state.items():
            server_params[key].copy_(value)

    def delta(adapter):  # ΔW of expert (0, 0)'s down projection
        return adapter.banks[0].experts[0].lora["down_proj"].delta_weight().detach()

    mean_delta = (delta(clients[0]) + delta(clients[1])) / 2
    exact = torch.allclose(delta(server), mean_delta, atol=1e-6)
    assert exact == (aggregation == "frozen-a")
    for adapter in clients:  # frozen A: never changed, the same seeded A everywhere
        a = adapter.banks[0].experts[0].lora["down_proj"].A
        assert torch.equal(a, server.banks[0].experts[0].lora["down_proj"].A) == (
            aggregation == "frozen-a")
