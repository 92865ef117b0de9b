"""Families recognised by the structure of their MoE block (hf_moe.moe_blocks), not by name:
each on a tiny random config, as a classifier backbone and as a causal LM, against the
untouched transformers model; families whose layout really differs fail in one line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hfedmoe.config import parse_run_config
from hfedmoe.model import UnsupportedModelError, load_tokenizer
from hfedmoe.model.causal_lm import export_causal_lm
from hfedmoe.model.hf_moe import SIGMOID_SCORED, generic_tiny_config
from hfedmoe.model.loading import TESTED_STRUCTURAL_FAMILIES, adapter_from_backbone, tiny_backbone
from hfedmoe.model.state import set_trainable
from hfedmoe.tasks import task_for

FAMILIES = TESTED_STRUCTURAL_FAMILIES


def inputs(rows=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_backbone_is_converted_exactly_and_traces_its_routers(family):
    reference = tiny_backbone(family, seed=0).eval()
    adapter = adapter_from_backbone(copy.deepcopy(reference), family, 3, seed=0)
    adapter.model.eval()
    assert adapter.geometry.num_experts == 8 and adapter.geometry.top_k == 2
    assert adapter.geometry.num_layers >= 1
    ids, mask = inputs()
    router_inputs = {}
    hooks = [r.register_forward_pre_hook(lambda _m, a, l=l: router_inputs.__setitem__(l, a[0]))
             for l, r in enumerate(adapter.routers)]
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = adapter.model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        with adapter.trace_routing() as trace:
            logits = adapter.model(ids, mask)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert logits.shape == (2, 3)
    for layer, (probs, index) in enumerate(zip(trace.probabilities, trace.top_k_index)):
        router = adapter.routers[layer]
        weight = next(p for n, p in router.named_parameters() if n.endswith("weight"))
        bias = dict(router.named_parameters()).get("bias")  # GPT-OSS's router has one
        raw = F.linear(router_inputs[layer].reshape(ids.numel(), -1).float(), weight.float(),
                       None if bias is None else bias.float())
        scores = torch.sigmoid(raw) if family in SIGMOID_SCORED else torch.softmax(raw, -1)
        torch.testing.assert_close(probs, scores / scores.sum(-1, keepdim=True), atol=1e-5,
                                   rtol=1e-4)
        assert index.shape == (ids.numel(), 2) and bool((index < 8).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_trains_only_budgeted_experts_and_exports_to_stock_transformers(tmp_path,
                                                                                   family):
    task = task_for("causal-lm")
    config = parse_run_config({"task": "causal-lm", "model.name": f"tiny:{family}"})
    adapter = task.build_adapter(config.model, 0, seed=0)
    reference = AutoModelForCausalLM.from_config(generic_tiny_config(family))
    ids, mask = inputs()
    params = set_trainable(adapter, "all")
    active = torch.zeros(adapter.geometry.num_experts, dtype=torch.bool)
    active[:2] = True
    adapter.model.train()
    with adapter.trace_routing() as trace, adapter.budgeted_experts(lambda layer: active):
        loss = task.loss(adapter.model(ids, mask), ids)
    loss.backward()
    for layer in range(adapter.geometry.num_layers):
        routed = set(trace.top_k_index[layer].flatten().tolist())
        for expert in range(adapter.geometry.num_experts):
            learns = expert < 2 and expert in routed  # active and routed: a gradient
            grads = [p.grad for p in adapter.expert_parameters(layer, expert).values()]
            assert all((g is not None) == learns for g in grads), (layer, expert)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
    adapter.model.eval()
    export_causal_lm(adapter.model, adapter.banks, load_tokenizer(config.model), tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(reloaded) is type(reference)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                                   adapter.model(ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, why", [("llama4_text", "fused experts layout"),
                                         ("jetmoe", "no MoE block of the standard"),
                                         ("longcat_flash", "fused experts layout"),
                                         ("nemotron_h", "no MoE block of the standard")])
def test_families_whose_layout_differs_are_refused_in_one_line(family, why):
    config = parse_run_config({"model.name": f"tiny:{family}"})
    with pytest.raises(UnsupportedModelError, match=why) as info:
        task_for("classification").build_adapter(config.model, 3, seed=0)
    assert "\n" not in str(info.value)


def test_an_unknown_model_type_is_refused_in_one_line():
    config = parse_run_config({"model.name": "tiny:no_such_family"})
    with pytest.raises(UnsupportedModelError, match="'no_such_family' is not supported") as info:
        task_for("classification").build_adapter(config.model, 3, seed=0)
    message = str(info.value)  # names what the user may pick instead, the built-ins included
    assert "\n" not in message and "qwen2_moe" in message
    assert "'minilm-moe'" in message and "'smollm2-moe'" in message
    assert "did you mean" not in message  # nothing close to suggest
    typo = parse_run_config({"model.name": "tiny:qwen2moe"})
    with pytest.raises(UnsupportedModelError, match="did you mean 'qwen2_moe'\\?"):
        task_for("classification").build_adapter(typo.model, 3, seed=0)
