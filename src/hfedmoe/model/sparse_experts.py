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
per-expert full-size scatter on the plain and one-pass paths. On a GPU the plain path (every
routed expert learns) makes no host synchronisation at all (:func:`dispatch_on_device`: the
group sizes stay a device tensor of counts and every expert of the layer is in the group, idle
ones with no rows); the one-pass path needs the active set on the host to build the graph, one
synchronisation per layer; ``budget.mode = "recompute"``
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

from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

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
        # plain path without host synchronisation: None = on CUDA only (on a CPU a sync costs
        # nothing and the host path skips idle experts); True/False force it (tests)
        self.sync_free: bool | None = None

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
        if active is None and self._runs_sync_free(hidden_states):
            return self._sync_free_forward(hidden_states, top_k_index, top_k_weights)
        slots = dispatch(top_k_index, self.num_experts, active)
        learning = sum(slots.active_sizes)  # sorted slots that belong to active experts
        outputs = []
        # the two groups gather their tokens apart: the active experts' backward keeps its
        # input, and a view into one gather of all slots would keep the inactive rows too
        # both groups' sizes go to the device in one copy (grouped kernels take them there)
        sizes = torch.tensor(slots.active_sizes + slots.inactive_sizes, dtype=torch.int64,
                             device=hidden_states.device)
        split = len(slots.active_sizes)
        if slots.active_experts:
            outputs.append(run_group([self.experts[e] for e in slots.active_experts],
                                     hidden_states[slots.token[:learning]], slots.active_sizes,
                                     sizes[:split]))
        if slots.inactive_experts:
            with torch.no_grad():
                outputs.append(run_group([self.experts[e] for e in slots.inactive_experts],
                                         hidden_states[slots.token[learning:]],
                                         slots.inactive_sizes, sizes[split:]))
        output = torch.zeros_like(hidden_states)
        if outputs:
            out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # (n, H)
            weighted = out * top_k_weights[slots.token, slots.slot, None]
            output.index_add_(0, slots.token, weighted.to(output.dtype))
        return output

    def _runs_sync_free(self, hidden_states: torch.Tensor) -> bool:
        kind = type(self.experts[0])
        grouped = hasattr(kind, "grouped_forward") and all(type(e) is kind for e in self.experts)
        wanted = hidden_states.is_cuda if self.sync_free is None else self.sync_free
        return wanted and grouped and getattr(kind, "sync_free", True)

    def _sync_free_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
        """Every routed expert with grad, without a host synchronisation: all experts of the
        layer in one group whose sizes stay on the device; dropped slots sort last and are
        masked out (grouped_mm leaves rows past the last offset unwritten)."""
        token, slot, counts, kept = dispatch_on_device(top_k_index, self.num_experts)
        # the dropped slots' rows are masked on the way in too: grouped_mm's backward leaves
        # the input gradient of rows past the last offset unwritten
        rows = torch.where(kept[:, None], hidden_states[token], 0.0)  # (tokens * k, H)
        out = type(self.experts[0]).grouped_forward(list(self.experts), rows, counts)
        # masked BEFORE the product: rows past the last offset hold whatever memory was
        # there (NaN possible), and 0 * NaN in the routing weights' gradient is NaN
        out = torch.where(kept[:, None], out, 0.0)
        weighted = out * top_k_weights[token, slot, None]
        output = torch.zeros_like(hidden_states)
        output.index_add_(0, token, weighted.to(output.dtype))
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
    come first. Experts without tokens are in neither group. One host synchronisation: the
    counts and the active set, read back together."""
    flat = top_k_index.reshape(-1)  # (tokens * k,)
    counts = _counts(flat, num_experts)  # (S + 1,)
    if active is None:
        active = torch.ones(num_experts, dtype=torch.bool, device=flat.device)
    # sort key: active experts first, then inactive ones, dropped slots last
    padded = torch.cat([active, active.new_zeros(1)])  # (S + 1,)
    key = flat + (num_experts + 1) * (~padded[flat]).long()
    key = torch.where(flat < num_experts, key, 2 * (num_experts + 1))
    order = torch.sort(key, stable=True).indices
    # ONE host synchronisation per layer: the counts and the active set, read together
    host = torch.cat([counts[:num_experts], active.long()]).tolist()
    counts_h, is_active = host[:num_experts], host[num_experts:]
    groups = [[e for e in range(num_experts) if counts_h[e] and bool(is_active[e]) == flag]
              for flag in (True, False)]
    kept = order[:sum(counts_h)]  # (n,) flat slot ids of routed slots
    k = top_k_index.shape[1]
    return Slots(kept // k, kept % k, groups[0], [counts_h[e] for e in groups[0]],
                 groups[1], [counts_h[e] for e in groups[1]])


def dispatch_on_device(top_k_index: torch.Tensor, num_experts: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dispatch` for the plain path without a host synchronisation: every slot of
    ``top_k_index`` (tokens, k) sorted by expert (dropped slots, value ``num_experts``, last).
    Returns ``token`` (tokens*k,), ``slot`` (tokens*k,), ``counts`` (num_experts,) int64 on
    the device (the experts' row counts, idle experts 0) and ``kept`` (tokens*k,) bool (the
    slot belongs to an expert; False for the dropped slots at the end)."""
    flat = top_k_index.reshape(-1)  # (tokens * k,)
    order = torch.sort(flat, stable=True).indices
    counts = _counts(flat, num_experts)[:num_experts]  # (S,)
    k = top_k_index.shape[1]
    return order // k, order % k, counts, flat[order] < num_experts


def _counts(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert, dropped slots (value ``num_experts``) last: (num_experts + 1,) int64.
    ``index_add_`` into a fixed size: ``bincount`` on CUDA synchronises (measured)."""
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))


def host_sizes(sizes: "Sequence[int] | torch.Tensor") -> list[int]:
    """Group sizes as a host list (a device tensor of counts is read back: one sync)."""
    return sizes.tolist() if isinstance(sizes, torch.Tensor) else list(sizes)


def run_group(experts: Sequence[nn.Module], x: torch.Tensor,
              sizes: "Sequence[int] | torch.Tensor",
              device_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """The outputs of ``experts`` on ``x`` (n, H), whose rows are the experts' tokens in order
    (``sizes[i]`` rows each; a host list, or a device tensor of counts): the experts'
    ``grouped_forward`` when they share a class that has one (given ``device_sizes``, the
    same sizes already on x's device, it takes those), else one call per expert on its
    slice. (n, H)."""
    kind = expert_class(experts[0])
    if hasattr(kind, "grouped_forward") and all(expert_class(e) is kind for e in experts):
        return kind.grouped_forward(experts, x, sizes if device_sizes is None else device_sizes)
    return torch.cat([expert(part) for expert, part in zip(experts, x.split(host_sizes(sizes)))])


def group_offsets(sizes: "Sequence[int] | torch.Tensor", device: torch.device) -> torch.Tensor:
    """grouped_mm's ``offs``: the cumulative row counts, (g,) int32 on ``device``."""
    counts = sizes if isinstance(sizes, torch.Tensor) else torch.tensor(list(sizes), device=device)
    return counts.cumsum(0).to(torch.int32)


def grouped_row_biases(biases: Sequence[torch.Tensor], x: torch.Tensor,
                       sizes: "Sequence[int] | torch.Tensor") -> torch.Tensor:
    """(n, m): row i of ``x``'s group gets its expert's bias (m,); rows past the last group
    (the dropped slots of the sync-free path) a zero bias, so no gradient. No host sync: each
    row's expert comes from the group offsets."""
    rows = torch.arange(x.shape[0], device=x.device)
    expert_of_row = torch.bucketize(rows, group_offsets(sizes, x.device), right=True)
    stacked = torch.stack(list(biases))  # (g, m)
    return torch.cat([stacked, stacked.new_zeros(1, stacked.shape[1])])[expert_of_row]


def expert_class(expert: nn.Module) -> type:
    """The expert's own class (torch's parametrizations, e.g. a quantized weight
    (hfedmoe.model.quantize), give each module a subclass of its own)."""
    cls = type(expert)
    return cls.__bases__[0] if parametrize.is_parametrized(expert) else cls


def grouped_linear(x: torch.Tensor,
                   weights: "Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]]",
                   sizes: "Sequence[int] | torch.Tensor") -> torch.Tensor:
    """Row block i of ``x`` (n, K) times ``weights[i]`` (N, K) transposed -> (n, N): one
    ``torch.nn.functional.grouped_mm`` over the stacked weights (gradients reach exactly the
    weights given). Under autocast both run in the autocast dtype (grouped_mm is on no
    autocast list; bf16 is what it takes on Hopper GPUs).

    ``weights`` may be a function returning them: when none of them learns (LoRA's frozen
    base, possibly quantized: hfedmoe.model.quantize) and ``x`` needs a gradient, the stacked
    weights are then not kept for the backward but read (dequantized) again there
    (:class:`_FrozenGroupedLinear`), so a client holds one group's weights at a time."""
    read = weights if callable(weights) else (lambda: weights)
    current = list(read())
    kind = x.device.type
    offs = group_offsets(sizes, x.device)
    if callable(weights) and x.requires_grad and not any(w.requires_grad for w in current):
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return _FrozenGroupedLinear.apply(x, offs, read, dtype, current)
    stacked = torch.stack(current)  # (g, N, K)
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else stacked.dtype
    out = torch.nn.functional.grouped_mm(x.to(dtype), stacked.to(dtype).transpose(-2, -1),
                                         offs=offs)  # (n, N)
    if out.requires_grad:  # grouped_mm's backward rejects an expanded (stride-0) gradient
        out.register_hook(torch.Tensor.contiguous)
    return out


class _FrozenGroupedLinear(torch.autograd.Function):
    """``grouped_mm(x, stack(read())ᵀ)`` for weights that do not learn: only ``x``'s gradient
    is computed, with the weights read again in the backward instead of saved."""

    @staticmethod
    def forward(ctx, x, offs, read, dtype, current):  # noqa: D401
        ctx.read, ctx.x_dtype = read, x.dtype
        ctx.dtype = dtype or current[0].dtype
        ctx.save_for_backward(offs)
        stacked = torch.stack(current).to(ctx.dtype)  # (g, N, K)
        return torch.nn.functional.grouped_mm(x.to(ctx.dtype), stacked.transpose(-2, -1),
                                              offs=offs)  # (n, N)

    @staticmethod
    def backward(ctx, grad_out):
        (offs,) = ctx.saved_tensors
        stacked = torch.stack(list(ctx.read())).to(ctx.dtype)  # (g, N, K)
        grad_x = torch.nn.functional.grouped_mm(grad_out.contiguous().to(ctx.dtype), stacked,
                                                offs=offs)  # (n, K)
        # rows past the last group (dropped slots) are left unwritten by grouped_mm
        rows = torch.arange(grad_x.shape[0], device=grad_x.device)
        grad_x = torch.where((rows < offs[-1]).unsqueeze(1), grad_x, 0.0)
        return grad_x.to(ctx.x_dtype), None, None, None, None
