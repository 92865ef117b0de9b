"""The plain path without host synchronisation (SparseExperts.sync_free; what runs on a GPU)
against the host-dispatch path: the same outputs and the same gradients, with idle experts
(no rows, no gradient), dropped slots (contribute nothing), LoRA factors (grouped_mm-aligned
and not) and the upcycled experts' biases. Forced on CPU, where grouped_mm runs too."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.config import parse_run_config
from hfedmoe.model import load_adapter
from hfedmoe.model.lora import LoRASettings, attach_factors
from hfedmoe.model.sparse_experts import SparseExperts, dispatch_on_device
from hfedmoe.model.upcycle import DenseActExpert


def _routing(tokens: int, k: int, num_experts: int, seed: int, idle: int | None = None,
             dropped: int = 0):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, num_experts, (tokens, k), generator=g)
    if idle is not None:  # one expert gets no token
        index[index == idle] = (idle + 1) % num_experts
    index.view(-1)[:dropped] = num_experts  # capacity-dropped slots
    weights = torch.rand(tokens, k, generator=g)
    return index, weights


def _run(bank: SparseExperts, x, index, weights, sync_free: bool):
    bank.sync_free = sync_free
    bank.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    out = bank(x, index, weights)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in bank.named_parameters()}
    return out.detach(), x.grad, weights.grad, grads


def _nan_past_the_groups(grouped_mm):
    """grouped_mm whose rows past the last offset are NaN: what it leaves there is whatever
    memory held (CI once saw NaN), so the worst case is made certain here."""

    def wrapped(x, w, offs=None, **kwargs):
        out = grouped_mm(x, w, offs=offs, **kwargs)
        if offs is not None and out.dim() == 2:
            out = out.clone()
            out[int(offs[-1]):] = float("nan")
        return out

    return wrapped


def _assert_same(bank, x, index, weights, monkeypatch=None):
    host = _run(bank, x, index, weights, sync_free=False)
    if monkeypatch is not None:
        monkeypatch.setattr(torch.nn.functional, "grouped_mm",
                            _nan_past_the_groups(torch.nn.functional.grouped_mm))
    free = _run(bank, x, index, weights, sync_free=True)
    for got, want in zip(free[:3], host[:3]):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert free[3].keys() == host[3].keys()
    for name, want in host[3].items():
        got = free[3][name]
        if want is None:  # an expert without tokens: no gradient at all on the host path
            assert got is None or not got.any(), name
        else:
            assert got is not None and torch.allclose(got, want, atol=1e-5), name
    return host, free


def _gated_bank(rank: int | None):
    config = parse_run_config({"model.name": "tiny:qwen2_moe"})
    adapter = load_adapter(config.model, num_labels=3, seed=0)
    if rank is not None:
        adapter.attach_lora(LoRASettings(rank=rank, alpha=8.0, dropout=0.0), seed=0)
        with torch.no_grad():
            for expert in adapter.banks[0].experts:
                for factors in expert.lora.values():
                    factors.B.normal_(0, 0.05)
    return adapter.banks[0]


@pytest.mark.parametrize("rank", [None, 4, 3])  # 3: LoRA rows unaligned for grouped_mm
def test_gated_experts_sync_free_equals_host_dispatch(rank, monkeypatch):
    bank = _gated_bank(rank)
    hidden = bank.experts[0].gate_up_proj.shape[1]
    index, weights = _routing(12, 2, bank.num_experts, seed=1, idle=3, dropped=5)
    x = torch.randn(12, hidden, generator=torch.Generator().manual_seed(2))
    host, _ = _assert_same(bank, x, index, weights, monkeypatch)
    idle = [n for n, g in host[3].items() if n.startswith("experts.3.") and g is None]
    assert idle, "the idle expert must have no gradient on the host path"


def test_upcycled_experts_with_bias_sync_free_equals_host_dispatch(monkeypatch):
    torch.manual_seed(0)
    experts = [DenseActExpert(8, 12, "gelu") for _ in range(4)]
    for index, expert in enumerate(experts):
        attach_factors(expert, LoRASettings(rank=4, alpha=8.0, dropout=0.0), seed=0, layer=0,
                       index=index)
        with torch.no_grad():
            for factors in expert.lora.values():
                factors.B.normal_(0, 0.05)
    bank = SparseExperts(experts, layer_index=0)
    index, weights = _routing(9, 2, 4, seed=3, idle=0, dropped=3)
    _assert_same(bank, torch.randn(9, 8), index, weights, monkeypatch)


def test_dispatch_on_device_sorts_by_expert_and_puts_dropped_slots_last():
    index = torch.tensor([[2, 0], [4, 2], [1, 4]])  # 4 = dropped (num_experts = 4)
    token, slot, counts, kept = dispatch_on_device(index, num_experts=4)
    assert counts.tolist() == [1, 1, 2, 0]
    assert kept.tolist() == [True, True, True, True, False, False]
    assert index[token, slot].tolist() == [0, 1, 2, 2, 4, 4]
