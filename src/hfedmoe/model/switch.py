"""SwitchTransformers (the paper's family), encoder only, as a classifier backbone.

Every sparse encoder block's ``layer[-1].mlp`` is a ``SwitchTransformersSparseMLP`` with a
top-1 ``router`` (``classifier.weight`` (S, H); expert capacity per sequence) and
``experts``, a ModuleDict of ``expert_i`` DenseActDense modules (``wi``, ``wo``, dropout).
:func:`convert_switch_experts` moves each one's modules (not copies; parameter names ``wi.weight``
and ``wo.weight`` unchanged) into a :class:`SwitchExpert` (its forward, plus the grouped
kernels, LoRA factors and a quantized base the other families' experts have) in a
:class:`SparseExperts` bank wrapped by :class:`OneHotDispatch`, which takes the sparse MLP's
one-hot dispatch call unchanged, so the MLP's forward runs as before.

The router returns ``(dispatch one-hot (B,T,S), top-1 probability (B,T,1), router_logits
(B,T,S))``; a token over its expert's capacity has an all-zero one-hot row, i.e. it is
dropped (its MLP output is 0). G_e(x) = softmax(router_logits), the router's own
probabilities; a dropped token's top_k_index is S.
"""

from __future__ import annotations

from typing import Sequence

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig

from hfedmoe.model.generic import UnsupportedModelError
from hfedmoe.model.lora import grouped_lora_delta, lora_linear
from hfedmoe.model.sparse_experts import SparseExperts, grouped_linear

FAMILY = "switch_transformers"
BASE_MODEL = transformers.SwitchTransformersEncoderModel
DROPOUT_KEYS = ("dropout_rate",)


class SwitchExpert(nn.Module):
    """One Switch (T5) expert, ``wo(dropout(act(wi(x))))`` as transformers'
    SwitchTransformersDenseActDense computes it, holding that module's ``wi`` (d_ff, d_model)
    and ``wo`` (d_model, d_ff) Linear layers (no biases), dropout and activation.
    (tokens, d_model) -> (tokens, d_model)."""

    def __init__(self, dense: nn.Module) -> None:
        super().__init__()
        self.wi, self.wo = dense.wi, dense.wo
        self.dropout, self.act = dense.dropout, dense.act
        self.lora = nn.ModuleDict()  # per-projection LoRA factors (hfedmoe.model.lora)

    def lora_targets(self) -> dict[str, nn.Parameter]:
        """The projections LoRA adapts, by name: weight (out, in)."""
        return {"wi": self.wi.weight, "wo": self.wo.weight}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = lora_linear(hidden_states, self.wi.weight, self.lora["wi"] if self.lora else None)
        hidden = self.dropout(self.act(hidden))  # (tokens, d_ff)
        return lora_linear(hidden, self.wo.weight, self.lora["wo"] if self.lora else None)

    @staticmethod
    def grouped_forward(experts: Sequence["SwitchExpert"], x: torch.Tensor,
                        sizes: "Sequence[int] | torch.Tensor") -> torch.Tensor:
        """Each expert's forward on its block of rows of ``x`` (n, d_model), ``sizes[i]`` rows
        for ``experts[i]``, as two grouped matrix products (two more per projection with LoRA
        factors). (n, d_model)."""
        lora = len(experts[0].lora) > 0
        # the weights as functions: read again in the backward when frozen (LoRA), not kept
        hidden = grouped_linear(x, lambda: [e.wi.weight for e in experts], sizes)  # (n, d_ff)
        if lora:
            hidden = hidden + grouped_lora_delta(x, [e.lora["wi"] for e in experts], sizes,
                                                 grouped_linear)
        hidden = experts[0].dropout(experts[0].act(hidden))
        out = grouped_linear(hidden, lambda: [e.wo.weight for e in experts], sizes)
        if lora:
            out = out + grouped_lora_delta(hidden, [e.lora["wo"] for e in experts], sizes,
                                           grouped_linear)
        return out


class OneHotDispatch(nn.Module):
    """Adapts the sparse MLP's experts call to a :class:`SparseExperts` bank.

    ``forward(hidden (tokens,H), dispatch (tokens,1,S) one-hot or all-zero, weights
    (tokens,1))``: top_k_index = argmax of the row, or S (dropped) for an all-zero row.
    """

    def __init__(self, bank: SparseExperts) -> None:
        super().__init__()
        self.bank = bank

    def forward(self, hidden_states: torch.Tensor, dispatch: torch.Tensor,
                routing_weights: torch.Tensor) -> torch.Tensor:
        return self.bank(hidden_states, dispatch_index(dispatch), routing_weights)  # (tokens, H)


def dispatch_index(dispatch: torch.Tensor) -> torch.Tensor:
    """(..., S) one-hot / all-zero dispatch -> (...) int64 expert index, S where dropped."""
    num_experts = dispatch.shape[-1]
    routed = dispatch.argmax(dim=-1)
    return torch.where(dispatch.any(dim=-1), routed, torch.full_like(routed, num_experts))


def convert_switch_experts(backbone: nn.Module) -> tuple[list[SparseExperts], list[nn.Module]]:
    """Move each sparse encoder block's experts into a bank, in place; return (banks, routers)."""
    banks: list[SparseExperts] = []
    routers: list[nn.Module] = []
    for index, block in enumerate(backbone.encoder.block):
        feed_forward = block.layer[-1]
        if not feed_forward.is_sparse:
            continue
        mlp = feed_forward.mlp
        experts = [mlp.experts[f"expert_{e}"] for e in range(mlp.router.num_experts)]
        if any(getattr(expert.wi, "bias", None) is not None for expert in experts):
            raise UnsupportedModelError(f"encoder.block.{index}: expert biases are not supported")
        bank = SparseExperts([SwitchExpert(expert) for expert in experts],
                             layer_index=len(banks))
        mlp.experts = OneHotDispatch(bank)
        banks.append(bank)
        routers.append(mlp.router)
    if not banks:
        raise UnsupportedModelError("this SwitchTransformers encoder has no sparse layer")
    return banks, routers


def switch_routing(output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router output -> (softmax(router_logits) (tokens, S) float32, top_k_index (tokens, 1))."""
    dispatch, _, router_logits = output
    num_experts = router_logits.shape[-1]
    probabilities = torch.softmax(router_logits.reshape(-1, num_experts).float(), dim=-1)
    return probabilities, dispatch_index(dispatch.reshape(-1, num_experts)).unsqueeze(-1)


def top_k(config: PretrainedConfig) -> int:
    return 1


def tiny_config(family: str = FAMILY) -> PretrainedConfig:
    """A ~2M-parameter random config: d_model 64, 4 encoder blocks of which 2 (blocks 1 and 3)
    are sparse with 8 experts, top-1, capacity 8 tokens per expert per sequence, MiniLM's
    vocabulary (30522, pad 0), no router jitter."""
    return transformers.SwitchTransformersConfig(
        vocab_size=30522, d_model=64, d_kv=16, d_ff=64, num_heads=4, num_layers=4,
        num_sparse_encoder_layers=2, num_decoder_layers=1, num_sparse_decoder_layers=0,
        num_experts=8, expert_capacity=8, router_jitter_noise=0.0, pad_token_id=0,
        eos_token_id=102, use_cache=False)
