"""A bank of per-expert modules with grouped token dispatch and budgeted backward.

Every supported family's routed experts end up in a :class:`SparseExperts` bank: one
``nn.Module`` per expert mapping (tokens_e, H) -> (tokens_e, H). The bank's forward has the
transformers experts signature ``(hidden_states, top_k_index, top_k_weights)`` so it can be
dropped in where a family's fused experts module was.

Execution (docs/hfedmoe.md, "One-pass budgeted experts"): the routing slots of a layer are
sorted by expert ONCE; each expert's tokens are then one contiguous slice, the experts run as
a group (:func:`run_group`: ``torch.nn.functional.grouped_mm`` over the stacked weights of the
group for the families that provide :meth:`grouped_forward`, else one call per expert on its
slice), and one ``index_add_`` per layer puts the weighted outputs back in token order. No
per-expert full-size scatter on the plain and one-pass paths; ``budget.mode = "recompute"``
(:meth:`SparseExperts._deferred_forward`) still runs one :class:`_DeferredExpert` call and
one ``index_add_`` per routed expert.

Which experts learn (method.md, section 2), by the plan attached to the bank:

* none (plain autograd): every routed expert runs with grad;
* :class:`OnlinePlan` (``budget.mode = "one-pass"``): right after the router, the plan picks
  the layer's active experts; they run with grad, the other routed experts run ONCE under
  ``torch.no_grad`` (output a constant, no activation kept, no backward compute, no
  gradient); nothing is recomputed;
* :class:`BackwardPlan` (``budget.mode = "recompute"``, for memory-bound devices): each
  routed expert runs under ``torch.no_grad`` inside :class:`_DeferredExpert`, which keeps only
  its input tokens; at backward time the plan says whether it is active, and active experts
  recompute their forward with grad. It keeps no expert activation at all until the backward,
  at the cost of a second forward of the active experts.

In every case the routing weights multiply the expert output outside the experts, so the
router learns from every routed expert.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from hfedmoe.model.adapter import BackwardPlan, OnlinePlan


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

    ``plan`` is attached by the adapter's ``budgeted_experts()`` (:class:`OnlinePlan`) or
    ``deferred_expert_backward()`` (:class:`BackwardPlan`) context and is ``None`` otherwise
    (plain autograd: every routed expert is trained).
    """

    def __init__(self, experts: Sequence[nn.Module], layer_index: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)
        self.layer_index = layer_index
        self.plan: BackwardPlan | OnlinePlan | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,  # (tokens, H)
        top_k_index: torch.Tensor,  # (tokens, k) int64; value num_experts = dropped slot
        top_k_weights: torch.Tensor,  # (tokens, k) routing weights
    ) -> torch.Tensor:  # (tokens, H)
        if isinstance(self.plan, BackwardPlan) and torch.is_grad_enabled():
            return self._deferred_forward(hidden_states, top_k_index, top_k_weights)
        active = None  # (S,) bool; None: every routed expert runs with grad
        if isinstance(self.plan, OnlinePlan) and torch.is_grad_enabled():
            active = self.plan.choose(self.layer_index).to(hidden_states.device)
            self.plan.chosen[self.layer_index] = active
        slots = dispatch(top_k_index, self.num_experts, active)
        learning = sum(slots.active_sizes)  # sorted slots that belong to active experts
        outputs = []
        # the two groups gather their tokens apart: the active experts' backward keeps its
        # input, and a view into one gather of all slots would keep the inactive rows too
        if slots.active_experts:
            outputs.append(run_group([self.experts[e] for e in slots.active_experts],
                                     hidden_states[slots.token[:learning]], slots.active_sizes))
        if slots.inactive_experts:
            with torch.no_grad():
                outputs.append(run_group([self.experts[e] for e in slots.inactive_experts],
                                         hidden_states[slots.token[learning:]],
                                         slots.inactive_sizes))
        output = torch.zeros_like(hidden_states)
        if outputs:
            out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # (n, H)
            weighted = out * top_k_weights[slots.token, slots.slot, None]
            output.index_add_(0, slots.token, weighted.to(output.dtype))
        return output

    def _deferred_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
        """``budget.mode = "recompute"``: per expert, :class:`_DeferredExpert`."""
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index)
        for expert_index in hit.tolist():
            if expert_index >= self.num_experts:
                continue
            token_idx, slot = torch.where(top_k_index == expert_index)
            tokens = hidden_states[token_idx]  # (tokens_e, H)
            expert = self.experts[expert_index]
            rng = torch.get_rng_state() if self.training and _has_dropout(expert) else None
            expert_out = _DeferredExpert.apply(
                tokens, expert, self.plan, self.layer_index, expert_index, rng,
                *expert.parameters(),
            )
            weighted = expert_out * top_k_weights[token_idx, slot, None]
            output.index_add_(0, token_idx, weighted.to(output.dtype))
        return output


class Slots(NamedTuple):
    """A layer's routing slots sorted by (inactive?, expert): active experts' tokens first."""

    token: torch.Tensor  # (n,) int64 token of each sorted slot
    slot: torch.Tensor  # (n,) int64 which of the token's k slots
    active_experts: list[int]  # experts with tokens that run with grad, in order
    active_sizes: list[int]  # their token counts
    inactive_experts: list[int]  # experts with tokens that run without grad
    inactive_sizes: list[int]


def dispatch(top_k_index: torch.Tensor, num_experts: int, active: torch.Tensor | None) -> Slots:
    """Sort the routing slots of ``top_k_index`` (tokens, k) by expert once (dropped slots,
    value ``num_experts``, left out); with ``active`` (S,) bool, the active experts' slots
    come first. Experts without tokens are in neither group. Host syncs: ``nonzero``, the
    counts and (when given) ``active``."""
    flat = top_k_index.reshape(-1)  # (tokens * k,)
    kept = torch.nonzero(flat < num_experts).reshape(-1)  # (n,) flat slot ids
    experts = flat[kept]
    key = experts if active is None else experts + num_experts * (~active[experts]).long()
    order = torch.sort(key, stable=True).indices
    kept, experts = kept[order], experts[order]
    counts = torch.bincount(experts, minlength=num_experts).tolist()  # host sync
    is_active = [True] * num_experts if active is None else active.tolist()
    groups = [[e for e in range(num_experts) if counts[e] and is_active[e] == flag]
              for flag in (True, False)]
    k = top_k_index.shape[1]
    return Slots(kept // k, kept % k, groups[0], [counts[e] for e in groups[0]],
                 groups[1], [counts[e] for e in groups[1]])


def run_group(experts: Sequence[nn.Module], x: torch.Tensor, sizes: Sequence[int]
              ) -> torch.Tensor:
    """The outputs of ``experts`` on ``x`` (n, H), whose rows are the experts' tokens in order
    (``sizes[i]`` rows each): the experts' ``grouped_forward`` when they share a class that has
    one, else one call per expert on its slice. (n, H)."""
    kind = type(experts[0])
    if hasattr(kind, "grouped_forward") and all(type(e) is kind for e in experts):
        return kind.grouped_forward(experts, x, sizes)
    return torch.cat([expert(part) for expert, part in zip(experts, x.split(list(sizes)))])


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], sizes: Sequence[int]
                   ) -> torch.Tensor:
    """Row block i of ``x`` (n, K) times ``weights[i]`` (N, K) transposed -> (n, N): one
    ``torch.nn.functional.grouped_mm`` over the stacked weights (gradients reach exactly the
    weights given)."""
    stacked = torch.stack(list(weights))  # (g, N, K)
    offsets = torch.tensor(list(sizes), device=x.device).cumsum(0).to(torch.int32)  # (g,)
    out = torch.nn.functional.grouped_mm(x, stacked.transpose(-2, -1), offs=offsets)  # (n, N)
    if out.requires_grad:  # grouped_mm's backward rejects an expanded (stride-0) gradient
        out.register_hook(torch.Tensor.contiguous)
    return out
