"""A bank of per-expert modules with token dispatch and deferred, budgeted backward.

Every supported family's routed experts end up in a :class:`SparseExperts` bank: one
``nn.Module`` per expert mapping (tokens_e, H) -> (tokens_e, H). The bank's forward has the
transformers experts signature ``(hidden_states, top_k_index, top_k_weights)`` so it can be
dropped in where a family's fused experts module was.

Budgeted backward (method.md, section 2): when a :class:`BackwardPlan` is attached, each
routed expert runs under ``torch.no_grad`` inside :class:`_DeferredExpert`, which keeps only
the expert's input tokens. At backward time the plan says whether the expert is active:
active experts recompute their forward with grad enabled and back-propagate (into their
parameters and their input tokens); inactive experts return no gradient at all, so they
cost no backward compute and none of their intermediate activations were ever stored.
The routing weights multiply the expert output outside the Function, so the router still
learns from every routed expert.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hfedmoe.model.adapter import BackwardPlan


class _DeferredExpert(torch.autograd.Function):
    """out = expert(x) with the backward decided later by ``plan.active[layer, index]``."""

    @staticmethod
    def forward(ctx, x, expert, plan, layer, index, rng_state, *params):  # noqa: D401
        ctx.expert, ctx.plan, ctx.layer, ctx.index = expert, plan, layer, index
        ctx.rng_state = rng_state
        ctx.save_for_backward(x)
        with torch.no_grad():
            return expert(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.expert.parameters()]
        none_tail = [None] * (5 + len(params))
        active = ctx.plan.active
        if active is not None and not bool(active[ctx.layer, ctx.index]):
            return (None, *none_tail)
        trainable = [p for p in params if p.requires_grad]
        with torch.enable_grad(), torch.random.fork_rng(devices=[], enabled=ctx.rng_state is not None):
            if ctx.rng_state is not None:
                torch.set_rng_state(ctx.rng_state)
            x_req = x.detach().requires_grad_(x.requires_grad)
            out = ctx.expert(x_req)
            inputs = ([x_req] if x.requires_grad else []) + trainable
            grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
        grad_x = grads.pop(0) if x.requires_grad else None
        by_param = {id(p): g for p, g in zip(trainable, grads)}
        param_grads = [by_param.get(id(p)) for p in params]
        return (grad_x, None, None, None, None, None, *param_grads)


def _has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


class SparseExperts(nn.Module):
    """Routed experts of one MoE layer, one module per expert.

    ``plan`` is attached by the adapter's ``deferred_expert_backward()`` context and is
    ``None`` otherwise (plain autograd: every routed expert is trained).
    """

    def __init__(self, experts: Sequence[nn.Module], layer_index: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)
        self.layer_index = layer_index
        self.plan: BackwardPlan | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,  # (tokens, H)
        top_k_index: torch.Tensor,  # (tokens, k) int64; value num_experts = dropped slot
        top_k_weights: torch.Tensor,  # (tokens, k) routing weights
    ) -> torch.Tensor:  # (tokens, H)
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index)
        deferred = self.plan is not None and torch.is_grad_enabled()
        for expert_index in hit.tolist():
            if expert_index >= self.num_experts:
                continue
            token_idx, slot = torch.where(top_k_index == expert_index)
            tokens = hidden_states[token_idx]  # (tokens_e, H)
            expert = self.experts[expert_index]
            if deferred:
                rng = torch.get_rng_state() if self.training and _has_dropout(expert) else None
                expert_out = _DeferredExpert.apply(
                    tokens, expert, self.plan, self.layer_index, expert_index, rng,
                    *expert.parameters(),
                )
            else:
                expert_out = expert(tokens)
            weighted = expert_out * top_k_weights[token_idx, slot, None]
            output.index_add_(0, token_idx, weighted.to(output.dtype))
        return output
