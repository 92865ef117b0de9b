"""Every supported family, tiny random configs: conversion, geometry, routing trace, state I/O,
budgeted backward, loading. References are the untouched transformers models and plain autograd."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers

from hfedmoe.config import parse_run_config
from hfedmoe.model import (
    SUPPORTED_FAMILIES,
    ModelAdapter,
    ModelNotFoundError,
    UnsupportedModelError,
    load_adapter,
    load_tokenizer,
    switch,
)
from hfedmoe.model.loading import adapter_from_backbone, tiny_backbone

NUM_LABELS = 3
# config attribute holding S, per family (read independently of the code under test)
EXPERTS_KEY = {"qwen2_moe": "num_experts", "qwen3_moe": "num_experts", "olmoe": "num_experts",
               "mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts",
               "switch_transformers": "num_experts"}


def model_cfg(name: str, **overrides):
    return dataclasses.replace(parse_run_config().model, name=name, **overrides)


def build(family: str, seed: int = 0) -> tuple[torch.nn.Module, ModelAdapter]:
    """(untouched transformers base model, adapter over a converted deep copy), both eval."""
    reference = tiny_backbone(family, seed).eval()
    adapter = adapter_from_backbone(copy.deepcopy(reference), family, NUM_LABELS, seed)
    adapter.model.eval()
    return reference, adapter


def batch(batch_size: int = 3, seq_len: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=gen)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if batch_size > 1:
        attention_mask[1, seq_len // 2:] = 0  # right padding in one row
        input_ids[1, seq_len // 2:] = 0
    return input_ids, attention_mask


def expected_geometry(family: str, config) -> tuple[int, int, int]:
    if family in ("qwen2_moe", "qwen3_moe"):
        layers = sum(1 for i in range(config.num_hidden_layers)
                     if i not in (config.mlp_only_layers or [])
                     and (i + 1) % config.decoder_sparse_step == 0)
    elif family == "deepseek_v3":
        layers = config.num_hidden_layers - config.first_k_dense_replace
    elif family == "switch_transformers":
        step = config.encoder_sparse_step
        layers = sum(1 for i in range(config.num_layers) if i % step == 1 or step == 1)
    else:
        layers = config.num_hidden_layers
    top_k = 1 if family == "switch_transformers" else config.num_experts_per_tok
    return layers, getattr(config, EXPERTS_KEY[family]), top_k


def router_weight(adapter: ModelAdapter, layer: int) -> torch.Tensor:
    params = adapter.router_parameters(layer)
    return params.get("weight", params.get("classifier.weight"))


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_geometry_matches_config_and_forward_gives_logits(family):
    _, adapter = build(family)
    geometry = adapter.geometry
    assert adapter.family == family
    assert (geometry.num_layers, geometry.num_experts, geometry.top_k) == \
        expected_geometry(family, adapter.model.backbone.config)
    assert (geometry.num_layers, geometry.num_experts) == (2, 8)
    assert 1_000_000 <= sum(p.numel() for p in adapter.model.parameters()) <= 3_000_000
    logits = adapter.model(*batch())
    assert logits.shape == (3, NUM_LABELS) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_conversion_preserves_backbone_outputs(family):
    reference, adapter = build(family)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        want = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        got = adapter.model.backbone(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(got.last_hidden_state, want, atol=1e-5, rtol=0)
    # no fused (S, ., .) expert tensor survives: every expert owns 2-D weights
    for layer in range(adapter.geometry.num_layers):
        for expert in range(adapter.geometry.num_experts):
            assert all(p.dim() == 2 for p in adapter.expert_parameters(layer, expert).values())


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_trace_routing_matches_router_inputs(family):
    _, adapter = build(family)
    geometry, inputs = adapter.geometry, {}
    pre_hooks = [router.register_forward_pre_hook(
        lambda _m, args, layer=layer: inputs.__setitem__(layer, args[0].detach()))
        for layer, router in enumerate(adapter.routers)]
    input_ids, attention_mask = batch()
    with adapter.trace_routing() as trace:
        adapter.model(input_ids, attention_mask)
    for hook in pre_hooks:
        hook.remove()
    tokens, limit = input_ids.numel(), geometry.num_experts
    assert len(trace.probabilities) == len(trace.top_k_index) == geometry.num_layers
    for layer, (probs, index) in enumerate(zip(trace.probabilities, trace.top_k_index)):
        assert probs.shape == (tokens, limit) and probs.dtype == torch.float32
        assert probs.requires_grad  # attached to the graph
        torch.testing.assert_close(probs.sum(-1), torch.ones(tokens), atol=1e-6, rtol=0)
        logits = inputs[layer].reshape(tokens, -1) @ router_weight(adapter, layer).detach().T
        scores = torch.sigmoid(logits) if family == "deepseek_v3" else torch.softmax(logits, -1)
        torch.testing.assert_close(probs.detach(), scores / scores.sum(-1, keepdim=True),
                                   atol=1e-6, rtol=1e-5)
        assert index.shape == (tokens, geometry.top_k) and index.dtype == torch.int64
        routed = index < limit
        if family == "switch_transformers":  # top-1 = argmax unless dropped (value S)
            assert (index <= limit).all()
            assert torch.equal(index[routed], probs.argmax(-1)[routed.squeeze(-1)])
        else:
            assert routed.all()
        if family == "deepseek_v3":  # group-limited: topk_group = 1 group of S / n_group
            group = index // (limit // 2)
            assert (group == group[:, :1]).all()
        elif family != "switch_transformers":
            want = probs.detach().topk(geometry.top_k, dim=-1).indices
            assert torch.equal(index.sort(-1).values, want.sort(-1).values)
    assert all(not router._forward_hooks for router in adapter.routers)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_parameters_partition_the_model(family):
    _, adapter = build(family)
    geometry = adapter.geometry
    expert_ids = [id(p) for l in range(geometry.num_layers) for e in range(geometry.num_experts)
                  for p in adapter.expert_parameters(l, e).values()]
    router_ids = [id(p) for l in range(geometry.num_layers)
                  for p in adapter.router_parameters(l).values()]
    every = dict(adapter.model.named_parameters())
    non_expert = adapter.non_expert_parameters("all")
    embeddings = {n for n, p in every.items() if p is adapter.model.backbone.get_input_embeddings().weight}
    assert len(set(expert_ids)) == len(expert_ids) == 2 * geometry.total_experts
    pointers = {p.data_ptr() for l in range(geometry.num_layers) for e in range(geometry.num_experts)
                for p in adapter.expert_parameters(l, e).values()}
    assert len(pointers) == len(expert_ids)  # no two experts share storage
    groups = [set(expert_ids), set(router_ids), {id(every[n]) for n in embeddings},
              {id(p) for p in non_expert.values()}]
    assert sum(len(g) for g in groups) == len(every)
    assert set().union(*groups) == {id(p) for p in every.values()}
    assert set(adapter.non_expert_parameters("head")) == {"classifier.weight", "classifier.bias"}
    assert embeddings and not embeddings & set(non_expert)
    shared = {"qwen2_moe": ["mlp.shared_expert.", "mlp.shared_expert_gate."],
              "deepseek_v3": ["mlp.shared_experts."]}.get(family, [])
    for part in shared:
        assert any(part in name for name in non_expert), part
    with pytest.raises(ValueError, match="scope"):
        adapter.non_expert_parameters("experts")


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_state_round_trips_and_checks_input(family):
    _, adapter = build(family)
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in adapter.expert_state(1, 5).items()}
    adapter.load_expert_state(1, 5, state)
    back = adapter.expert_state(1, 5)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    back[next(iter(back))].add_(1.0)  # a detached clone: the model is untouched
    assert all(torch.equal(p, state[k]) for k, p in adapter.expert_parameters(1, 5).items())
    assert not torch.equal(adapter.expert_state(1, 4)[next(iter(state))], state[next(iter(state))])
    name = next(iter(state))
    with pytest.raises(ValueError, match="expected"):
        adapter.load_expert_state(1, 5, {**state, name: state[name][:1]})
    with pytest.raises(ValueError, match="expected"):
        adapter.load_expert_state(1, 5, {**state, name: state[name].double()})
    with pytest.raises(ValueError, match="missing"):
        adapter.load_expert_state(1, 5, {name: state[name]})
    with pytest.raises(IndexError):
        adapter.expert_state(2, 0)
    router = {k: torch.randn(v.shape, generator=gen) for k, v in adapter.router_state(0).items()}
    adapter.load_router_state(0, router)
    assert all(torch.equal(adapter.router_state(0)[k], router[k]) for k in router)
    head = {k: torch.randn(v.shape, generator=gen) for k, v in adapter.non_expert_state("head").items()}
    adapter.load_non_expert_state(head)
    assert all(torch.equal(adapter.non_expert_state("all")[k], head[k]) for k in head)
    with pytest.raises(ValueError, match="unknown"):
        adapter.load_non_expert_state({"backbone.no.such.weight": torch.zeros(1)})


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_expert_change_affects_output_only_if_routed(family):
    _, adapter = build(family)
    input_ids, attention_mask = batch(batch_size=1, seq_len=3)
    with torch.no_grad(), adapter.trace_routing() as trace:
        before = adapter.model(input_ids, attention_mask)
    layer = adapter.geometry.num_layers - 1
    hit = set(trace.top_k_index[layer].flatten().tolist()) - {adapter.geometry.num_experts}
    idle = sorted(set(range(adapter.geometry.num_experts)) - hit)
    assert hit and idle
    for expert, changes in ((idle[0], False), (min(hit), True)):
        with torch.no_grad():
            for p in adapter.expert_parameters(layer, expert).values():
                p.add_(torch.randn_like(p))
            after = adapter.model(input_ids, attention_mask)
        assert torch.equal(after, before) is not changes, (expert, changes)


def loop_forward(bank, active):
    """An independent reference for a bank: one call per routed expert on its tokens, outputs
    of experts not in ``active`` (S,) bool detached (the pre-grouping implementation)."""
    def forward(hidden_states, top_k_index, top_k_weights):
        output = torch.zeros_like(hidden_states)
        for expert_index in range(bank.num_experts):
            token_idx, slot = torch.where(top_k_index == expert_index)
            if len(token_idx) == 0:
                continue
            with torch.set_grad_enabled(bool(active[expert_index]) and torch.is_grad_enabled()):
                out = bank.experts[expert_index](hidden_states[token_idx])
            output.index_add_(0, token_idx, out * top_k_weights[token_idx, slot, None])
        return output
    return forward


@pytest.mark.parametrize("mode", ["one-pass", "recompute"])
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_budgeted_backward_equals_autograd_with_inactive_outputs_detached(family, mode):
    _, adapter = build(family)
    twin = copy.deepcopy(adapter)
    input_ids, attention_mask = batch()
    labels = torch.tensor([0, 1, 2])
    g = adapter.geometry
    active = torch.zeros(g.num_layers, g.num_experts, dtype=torch.bool)

    def one_routed_expert(layer):  # the first token's first routed expert learns
        active[layer, int(trace.top_k_index[layer][0, 0])] = True
        return active[layer]

    plans = {"one-pass": lambda: adapter.budgeted_experts(one_routed_expert),
             "recompute": adapter.deferred_expert_backward}
    with adapter.trace_routing() as trace, plans[mode]() as plan:
        assert all(bank.plan is plan for bank in adapter.banks)
        loss = torch.nn.functional.cross_entropy(adapter.model(input_ids, attention_mask), labels)
        if mode == "recompute":
            for layer in range(g.num_layers):
                one_routed_expert(layer)
            plan.active = active
        else:
            assert torch.equal(plan.active(g.num_layers, g.num_experts), active)
    assert all(bank.plan is None for bank in adapter.banks)
    loss.backward()
    for layer, bank in enumerate(twin.banks):
        bank.forward = loop_forward(bank, active[layer])
    torch.nn.functional.cross_entropy(twin.model(input_ids, attention_mask), labels).backward()
    got, want = dict(adapter.model.named_parameters()), dict(twin.model.named_parameters())
    for name, param in got.items():
        if want[name].grad is None:
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad, want[name].grad, atol=1e-6, rtol=1e-5, msg=name)
    for layer in range(g.num_layers):
        for expert in range(g.num_experts):
            has_grad = any(p.grad is not None for p in adapter.expert_parameters(layer, expert).values())
            assert has_grad == bool(active[layer, expert])
        assert all(p.grad is not None for p in adapter.router_parameters(layer).values())


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_grouped_experts_equal_one_call_per_expert(family):
    """Plain autograd (no plan): outputs and every gradient as the per-expert loop's."""
    _, adapter = build(family)
    twin = copy.deepcopy(adapter)
    for bank in twin.banks:
        bank.forward = loop_forward(bank, torch.ones(bank.num_experts, dtype=torch.bool))
    input_ids, attention_mask = batch()
    outputs = [m.model(input_ids, attention_mask) for m in (adapter, twin)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-5)
    for out in outputs:
        out.square().sum().backward()
    want = dict(twin.model.named_parameters())
    for name, param in adapter.model.named_parameters():
        assert (param.grad is None) == (want[name].grad is None), name
        if param.grad is not None:
            torch.testing.assert_close(param.grad, want[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_unsupported_family_names_the_supported_ones(tmp_path):
    with pytest.raises(UnsupportedModelError) as error:
        load_adapter(model_cfg("tiny:llama4_text"), NUM_LABELS, seed=0)
    message = str(error.value)
    assert "llama4_text" in message and "\n" not in message
    assert all(family in message for family in SUPPORTED_FAMILIES)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="model_type 'bert'"):
        load_adapter(model_cfg(str(tmp_path)), NUM_LABELS, seed=0)


def test_unknown_name_gives_a_one_line_error(tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        load_adapter(model_cfg(str(tmp_path / "missing")), NUM_LABELS, seed=0)
    assert "missing" in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("family", ["qwen3_moe", "switch_transformers"])
def test_load_adapter_is_deterministic_and_leaves_rng_alone(family):
    rng = torch.get_rng_state()
    cfg = model_cfg(f"tiny:{family}", dropout=0.2)
    first, second = (load_adapter(cfg, NUM_LABELS, seed=7) for _ in range(2))
    other = load_adapter(cfg, NUM_LABELS, seed=8)
    assert torch.equal(torch.get_rng_state(), rng)
    a, b, c = (x.model.state_dict() for x in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])
    assert sum(not torch.equal(a[k], c[k]) for k in a) > len(a) // 2
    assert not first.model.training
    key = "dropout_rate" if family == "switch_transformers" else "attention_dropout"
    assert getattr(first.model.backbone.config, key) == 0.2


@pytest.mark.parametrize("family, model_class", [
    ("qwen2_moe", transformers.Qwen2MoeForCausalLM),
    ("switch_transformers", transformers.SwitchTransformersForConditionalGeneration),
])
def test_local_directory_load(tmp_path, family, model_class):
    config = tiny_backbone(family, 0).config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        saved = model_class(config).eval()
    saved.save_pretrained(tmp_path)
    adapter = load_adapter(model_cfg(str(tmp_path), dropout=0.1), NUM_LABELS, seed=0)
    assert adapter.family == family and adapter.geometry.num_experts == 8
    reference = saved.encoder if family == "switch_transformers" else saved.model
    input_ids, attention_mask = batch()
    with torch.no_grad():
        want = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        got = adapter.model.backbone(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(got.last_hidden_state, want, atol=1e-5, rtol=0)
    key = "dropout_rate" if family == "switch_transformers" else "attention_dropout"
    assert getattr(adapter.model.backbone.config, key) == 0.1
    assert all(p.dtype == torch.float32 for p in adapter.model.parameters())


def test_tokenizers():
    pytest.importorskip("hfedmoe.model.minilm")
    tokenizer = load_tokenizer(model_cfg("tiny:olmoe"))
    assert tokenizer.vocab_size == 30522 and tokenizer.pad_token_id == 0


def test_tokenizer_without_pad_uses_eos(tmp_path):
    minilm = pytest.importorskip("hfedmoe.model.minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.minilm_model_dir())
    tokenizer.pad_token, tokenizer.eos_token = None, "[SEP]"
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(model_cfg(str(tmp_path)))
    assert loaded.pad_token == "[SEP]"


def test_minilm_moe():
    minilm = pytest.importorskip("hfedmoe.model.minilm")
    if not hasattr(minilm, "build_minilm_moe_backbone"):
        pytest.skip("hfedmoe.model.minilm.build_minilm_moe_backbone is not written yet")
    adapter = load_adapter(model_cfg("minilm-moe", num_experts=4, top_k=2), NUM_LABELS, seed=0)
    assert adapter.family == "minilm-moe"
    assert (adapter.geometry.num_layers, adapter.geometry.num_experts, adapter.geometry.top_k) == (6, 4, 2)
    assert not any(n.startswith("backbone.embeddings.") for n in adapter.non_expert_parameters("all"))
    input_ids, attention_mask = batch(seq_len=8)
    with torch.no_grad(), adapter.trace_routing() as trace:
        logits = adapter.model(input_ids, attention_mask)
    assert logits.shape == (3, NUM_LABELS) and len(trace.probabilities) == 6
    torch.testing.assert_close(trace.probabilities[0].sum(-1), torch.ones(24), atol=1e-6, rtol=0)


def test_switch_capacity_overflow_is_a_dropped_slot():
    config = switch.tiny_config()
    config.expert_capacity = 2  # 10 tokens per sequence, top-1: most experts overflow
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = transformers.SwitchTransformersEncoderModel(config).eval()
    adapter = adapter_from_backbone(copy.deepcopy(reference), switch.FAMILY, NUM_LABELS, seed=0)
    input_ids, attention_mask = batch()
    with torch.no_grad(), adapter.trace_routing() as trace:
        want = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        got = adapter.model.backbone(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(got.last_hidden_state, want, atol=1e-5, rtol=0)
    for index in trace.top_k_index:
        per_sequence = index.reshape(3, -1)
        assert (per_sequence == 8).any()  # some tokens dropped ...
        for row in per_sequence:  # ... and no expert exceeds its capacity in a sequence
            assert torch.bincount(row, minlength=9)[:8].max() <= 2
    dispatch = torch.tensor([[[0, 1, 0]], [[0, 0, 0]], [[1, 0, 0]]])  # (tokens, 1, S)
    assert switch.dispatch_index(dispatch).tolist() == [[1], [3], [0]]
