"""LoRA factors on attention projections (``lora.targets = "experts+attention"``) against
independent re-computations: which projections get factors, B = 0 leaves the model unchanged,
the merged weight is W + (alpha / r)·B·A, only the factors learn, they travel as non-expert
state (only B with a frozen A), and the cost model charges them."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.config import ConfigError, parse_run_config
from hfedmoe.model import load_adapter
from hfedmoe.model.lora import LoRASettings
from hfedmoe.model.state import set_trainable

SETTINGS = LoRASettings(rank=4, alpha=8.0, dropout=0.0)
# the projections a family's attention holds, by their last name
PROJECTIONS = {"minilm-moe": {"query", "key", "value", "dense"},
               "tiny:qwen2_moe": {"q_proj", "k_proj", "v_proj", "o_proj"}}


def _adapter(name: str, settings: LoRASettings | None = SETTINGS):
    config = parse_run_config({"model.name": name})
    adapter = load_adapter(config.model, num_labels=3, seed=0)
    if settings is not None:
        adapter.attach_lora(settings, seed=0, attention=True)
    return adapter


def _batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(1000, 30000, (4, 12), generator=g),
            torch.ones(4, 12, dtype=torch.long), torch.randint(0, 3, (4,), generator=g))


def _logits(adapter, ids, mask):
    adapter.model.eval()
    with torch.no_grad():
        return adapter.model(ids, mask)


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_every_attention_projection_gets_factors_and_b_zero_changes_nothing(name):
    base, adapted = _adapter(name, None), _adapter(name)
    factors = adapted.attention_factors()
    layers = {n.split(".attention")[0].split(".self_attn")[0] for n in factors}
    assert {n.rsplit(".", 1)[1] for n in factors} == PROJECTIONS[name]
    assert len(factors) == 4 * len(layers)  # four projections in every attention layer
    modules = dict(adapted.model.named_modules())
    for n, f in factors.items():  # A (r, in), B (out, r) of the projection's weight (out, in)
        out_features, in_features = modules[n].weight.shape
        assert f.A.shape == (4, in_features) and f.B.shape == (out_features, 4)
    ids, mask, _ = _batch()
    assert torch.equal(_logits(base, ids, mask), _logits(adapted, ids, mask))


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_the_update_is_scaling_b_a_on_the_weight_and_merging_keeps_the_outputs(name):
    adapted, reference = _adapter(name), _adapter(name, None)
    g = torch.Generator().manual_seed(3)
    modules = dict(reference.model.named_modules())
    with torch.no_grad():
        for n, f in adapted.attention_factors().items():
            f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.05)
            # independent: the plain model with W + (alpha / r)·B·A written into its weights
            modules[n].weight.add_(SETTINGS.scaling * f.B @ f.A)
    ids, mask, _ = _batch()
    ours = _logits(adapted, ids, mask)
    assert torch.allclose(ours, _logits(reference, ids, mask), atol=1e-5)
    assert not torch.allclose(ours, _logits(_adapter(name, None), ids, mask), atol=1e-3)
    adapted.merge_lora()  # factors folded in, hooks gone: a plain model
    assert not adapted.attention_factors()
    assert not any(".lora." in n for n, _ in adapted.model.named_parameters())
    assert torch.allclose(_logits(adapted, ids, mask), ours, atol=1e-5)


def test_only_the_factors_learn_and_they_travel_as_non_expert_state():
    adapter = _adapter("minilm-moe")
    factors = adapter.attention_factors()
    params = set_trainable(adapter, "head")
    shared = adapter.non_expert_parameters("head")
    factor_names = {f"{n}.lora.{ab}" for n in factors for ab in ("A", "B")}
    assert factor_names <= shared.keys()  # they travel and aggregate like the head
    assert factor_names <= adapter.non_expert_parameters("all").keys()
    weights = {n: m.weight.detach().clone() for n, m in adapter.model.named_modules() if n in factors}
    before = {n: (f.A.detach().clone(), f.B.detach().clone()) for n, f in factors.items()}
    ids, mask, labels = _batch()
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    adapter.model.train()
    torch.nn.functional.cross_entropy(adapter.model(ids, mask), labels).backward()
    optimizer.step()
    modules = dict(adapter.model.named_modules())
    for n, f in factors.items():
        assert torch.equal(modules[n].weight, weights[n])  # the frozen base never moves
        assert not torch.equal(f.B, before[n][1])  # B learns from the first step (A ≠ 0)
    frozen_a = _adapter("minilm-moe", LoRASettings(4, 8.0, 0.0, train_a=False))
    names = set(frozen_a.non_expert_parameters("head"))
    assert {f"{n}.lora.B" for n in factors} <= names
    assert not any(n.endswith(".lora.A") for n in names)  # A: the seeded init everywhere


def test_the_cost_model_charges_the_attention_factors():
    from hfedmoe.costs import training_costs

    base = {"train.adapter": "lora", "model.name": "minilm-moe"}
    plain = parse_run_config(base)
    attention = parse_run_config({**base, "lora.targets": "experts+attention"})
    adapter = _built(attention)
    _, without = training_costs(_built(plain), plain)
    _, with_attention = training_costs(adapter, attention)
    state = sum(p.numel() * 4 for f in adapter.attention_factors().values()
                for p in f.parameters())
    tokens = attention.train.batch_size * attention.model.max_length
    saved = sum(4 * tokens * (f.A.shape[0] + f.A.shape[1])
                for f in adapter.attention_factors().values())
    # the weights, their gradients and two AdamW moments, and what their backward keeps
    assert with_attention - without == 4 * state + saved


def _built(config):
    from hfedmoe.client import build_model

    return build_model(config, num_labels=3)


def test_training_attention_fully_and_with_factors_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="model.trainable-non-expert"):
        parse_run_config({"train.adapter": "lora", "lora.targets": "experts+attention",
                          "model.trainable-non-expert": "all"})
    parse_run_config({"train.adapter": "lora", "lora.targets": "experts+attention"})
