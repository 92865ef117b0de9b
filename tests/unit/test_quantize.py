"""model.quantization: the routed experts' frozen weights held in NF4 / int8 (bitsandbytes),
read back dequantized; LoRA learns on them; nothing else changes."""

import pytest
import torch

from hfedmoe.client import build_model
from hfedmoe.config import ConfigError, parse_run_config
from hfedmoe.model.quantize import quantize_weights, stored_bytes
from hfedmoe.model.sparse_experts import grouped_linear
from hfedmoe.model.state import set_trainable


def lm(quantization, **extra):
    config = parse_run_config({"task": "causal-lm", "model.name": "tiny:qwen2_moe",
                               "train.adapter": "lora", "model.quantization": quantization,
                               **extra})
    adapter = build_model(config, 0)
    return adapter, set_trainable(adapter, "head")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (3, 12), generator=g)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("scheme, max_error, max_bytes", [("nf4", 0.12, 0.13),
                                                          ("int8", 0.01, 0.26)])
def test_the_stored_weights_shrink_and_dequantize_close_to_the_float_ones(scheme, max_error,
                                                                          max_bytes):
    import bitsandbytes.functional as bnb

    # an LLM-sized weight (SmolLM2's MLP, 1536 x 576): bytes held as stored
    layer = torch.nn.Linear(576, 1536, bias=False).requires_grad_(False)
    float_bytes = stored_bytes(layer)
    quantize_weights([layer.weight], layer, scheme)
    # measured: nf4 0.129 (4 bits + 1 byte per block of 64 + the double-quantized scales'
    # own, ~1.4 KB per tensor), int8 0.251 (8 bits + 4 bytes per row)
    assert stored_bytes(layer) <= max_bytes * float_bytes
    full, _ = lm("none")
    small, _ = lm(scheme)
    for bank_full, bank_small in zip(full.banks, small.banks):
        for e_full, e_small in zip(bank_full.experts, bank_small.experts):
            w, q = e_full.gate_up_proj, e_small.gate_up_proj  # the latter dequantized on read
            assert q.dtype == torch.float32 and q.shape == w.shape
            assert float((q - w).norm() / w.norm()) <= max_error
    # an independent dequantization with bitsandbytes' own round trip
    w = full.banks[0].experts[1].down_proj.detach()
    if scheme == "nf4":
        codes, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                         compress_statistics=True)
        expected = bnb.dequantize_4bit(codes, state)
    else:
        codes, scale, _ = bnb.int8_vectorwise_quant(w)
        expected = bnb.int8_vectorwise_dequant(codes, scale)
    assert torch.equal(small.banks[0].experts[1].down_proj, expected.reshape(w.shape))


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_lora_on_a_quantized_base_is_lora_on_the_dequantized_weights(scheme):
    """Same factors, same routers: the quantized model's logits and gradients equal those of
    a float model whose expert weights are the dequantized ones."""
    quantized, q_params = lm(scheme)
    plain, p_params = lm("none")
    with torch.no_grad():
        for bank_q, bank_p in zip(quantized.banks, plain.banks):
            for e_q, e_p in zip(bank_q.experts, bank_p.experts):
                e_p.gate_up_proj.copy_(e_q.gate_up_proj)
                e_p.down_proj.copy_(e_q.down_proj)
        for key in q_params:  # trained-looking factors
            if key.endswith(".B"):
                q_params[key].normal_(0, 0.05, generator=torch.Generator().manual_seed(len(key)))
                p_params[key].copy_(q_params[key])
    ids, mask = batch()
    for model in (quantized, plain):
        model.model(ids, mask).float().pow(2).mean().backward()
    torch.testing.assert_close(quantized.model(ids, mask), plain.model(ids, mask))
    for key, p in q_params.items():
        other = p_params[key].grad
        assert (p.grad is None) == (other is None), key
        if p.grad is not None:
            torch.testing.assert_close(p.grad, other, rtol=1e-4, atol=1e-6)
    # no stored (quantized) tensor takes part in training
    assert all(not p.requires_grad for n, p in quantized.model.named_parameters()
               if "parametrizations" in n)


def test_merging_dequantizes_then_folds_the_factors():
    adapter, params = lm("nf4")
    with torch.no_grad():
        for key, p in params.items():
            if key.endswith(".B"):
                p.normal_(0, 0.05)
    ids, mask = batch(1)
    before = adapter.model(ids, mask).detach()
    adapter.merge_lora()
    assert not any("parametrizations" in n or ".lora." in n
                   for n, _ in adapter.model.named_parameters())
    torch.testing.assert_close(adapter.model(ids, mask), before, rtol=1e-4, atol=1e-5)


def test_frozen_grouped_product_reads_the_weights_again_in_the_backward(monkeypatch):
    """x's gradient equals plain autograd's; rows past the last group get a zero gradient
    (grouped_mm leaves them undefined: here NaN); the weights are read twice (forward,
    backward) and not kept in between."""
    real = torch.nn.functional.grouped_mm

    def undefined_tail(a, b, offs=None, **kwargs):
        out = real(a, b, offs=offs, **kwargs)
        out[int(offs[-1]):] = float("nan")
        return out

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", undefined_tail)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 4, generator=g) for _ in range(3)]
    x = torch.randn(9, 4, generator=g, requires_grad=True)  # 2 + 3 + 2 rows, 2 dropped
    sizes = torch.tensor([2, 3, 2])
    reads = []

    def read():
        reads.append(1)
        return weights

    out = grouped_linear(x, read, sizes)
    grad_out = torch.randn(9, 8, generator=g)
    grad_out[7:] = 0
    (grad,) = torch.autograd.grad(out[:7], x, grad_out[:7])
    assert len(reads) == 2
    expected = torch.cat([grad_out[:2] @ weights[0], grad_out[2:5] @ weights[1],
                          grad_out[5:7] @ weights[2], torch.zeros(2, 4)])
    torch.testing.assert_close(grad, expected)
    assert torch.isnan(out[7:]).all()  # the stand-in really leaves the tail undefined
    torch.testing.assert_close(out[:7], torch.cat([x[:2] @ weights[0].T, x[2:5] @ weights[1].T,
                                                   x[5:7] @ weights[2].T]))


def test_quantization_without_lora_is_refused():
    with pytest.raises(ConfigError, match="model.quantization"):
        parse_run_config({"model.quantization": "nf4"})


def test_the_cost_model_charges_the_base_as_held_and_the_factors_activations():
    """Independent sums: a quantized base costs its stored bytes (not 4 per weight), a LoRA
    expert adds r floats per routed token per projection, and its weights' shapes (hence
    its activations) do not change with the quantization."""
    from hfedmoe.costs import training_costs
    from hfedmoe.model.quantize import stored_bytes

    costs = {}
    for adapter_kind, scheme in (("none", "none"), ("lora", "none"), ("lora", "nf4")):
        config = parse_run_config({"task": "causal-lm", "model.name": "tiny:qwen2_moe",
                                   "train.adapter": adapter_kind, "lora.rank": 4,
                                   "model.quantization": scheme})
        adapter = build_model(config, 0)
        costs[adapter_kind, scheme] = (*training_costs(adapter, config), adapter, config)
    float_cost, float_base, float_lora, config = costs["lora", "none"]
    nf4_cost, nf4_base, nf4_lora, _ = costs["lora", "nf4"]
    held = sum(stored_bytes(b) for b in nf4_lora.banks)
    as_float = sum(stored_bytes(b) for b in float_lora.banks)
    assert float_base - nf4_base == as_float - held > 0
    assert nf4_cost == float_cost
    g = float_lora.geometry
    tokens = config.train.batch_size * config.model.max_length
    routed = -(-tokens * g.top_k // g.num_experts)
    extra = costs["lora", "none"][0].activation_bytes - costs["none", "none"][0].activation_bytes
    assert extra == 4 * routed * 4 * 2  # rank 4, two projections
