"""``model.precision``: bf16 autocast with float32 weights, gradients and logits; "auto" is
float32 on a CPU; the grouped expert kernel runs in the autocast dtype."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.config import ConfigError, parse_run_config
from hfedmoe.model import load_adapter
from hfedmoe.model.loading import autocast_dtype


def _adapter(precision: str):
    config = parse_run_config({"model.name": "tiny:qwen2_moe", "model.precision": precision})
    return load_adapter(config.model, num_labels=3, seed=0)


def test_auto_is_float32_on_cpu_and_bf16_when_asked():
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("bf16-mixed", "cpu") is torch.bfloat16
    with pytest.raises(ConfigError, match="model.precision"):
        parse_run_config({"model.precision": "fp16"})


def test_bf16_mixed_trains_with_float32_weights_and_grads_and_close_logits():
    fp32, bf16 = _adapter("fp32"), _adapter("bf16-mixed")
    ids = torch.randint(1000, 30000, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    seen = []
    hook = torch.nn.functional.grouped_mm

    def spy(x, w, **kwargs):
        seen.append((x.dtype, w.dtype))
        return hook(x, w, **kwargs)

    torch.nn.functional.grouped_mm = spy
    try:
        logits = bf16.model.train()(ids, mask)
    finally:
        torch.nn.functional.grouped_mm = hook
    reference = fp32.model.train()(ids, mask)
    assert logits.dtype == torch.float32
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)
    assert not torch.equal(logits, reference)  # computed in bf16 ...
    assert torch.allclose(logits, reference, atol=0.05, rtol=0.05)  # ... close to float32
    logits.logsumexp(-1).mean().backward()
    weight = bf16.expert_parameters(0, 0)["gate_up_proj"]
    assert weight.dtype == torch.float32 and weight.grad is not None
    assert weight.grad.dtype == torch.float32 and weight.grad.abs().sum() > 0
