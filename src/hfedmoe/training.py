"""Local training on one client and evaluation (torch only; no Flower here).

One local round (method.md, section 5, step 2), per batch:
forward with normal routing (router outputs traced) -> loss (+ load-balancing loss) ->
backward through only the experts that may learn -> optimizer step. ``selector`` picks those
experts (None = every routed expert): with ``budget.mode = "one-pass"`` layer by layer during
the forward, right after each router; with ``"recompute"`` after the forward (see
:func:`train_locally`). The loop measures what the budget is about: the number of experts that
actually received a gradient in each batch, the step time, and training memory.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch

from hfedmoe.data.tokenize import TokenizedSet, batches, eval_batches
from hfedmoe.measurement import (
    AllocatorPeak,
    SavedActivationMeter,
    gradient_bytes,
    optimizer_state_bytes,
    tensor_bytes,
)
from hfedmoe.model.adapter import MoEAdapter, RoutingTrace
from hfedmoe.selection import BatchSelection, selection_closeness
from hfedmoe.tasks.classification import classification_loss

# selector(trace, attention_mask (B,T)) -> the batch's active experts and importance (Eq. 15).
ExpertSelector = Callable[[RoutingTrace, torch.Tensor], BatchSelection]
# loss_fn(logits, labels) -> the mean loss of one batch (hfedmoe.tasks: each task's ``loss``)
TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# routing_loss(trace, attention_mask (B, T)) -> a scalar added to the loss (a method's term)
RoutingLoss = Callable[[RoutingTrace, torch.Tensor], torch.Tensor]


@runtime_checkable
class OnlineSelector(Protocol):
    """A selector that can also decide each layer's active experts DURING the forward
    (``budget.mode = "one-pass"``). A selector without these methods runs on the recompute
    path whatever the mode."""

    def layer_chooser(self, trace: RoutingTrace, attention_mask: torch.Tensor
                      ) -> Callable[[int], torch.Tensor]:
        """For one batch: MoE layer l -> (S,) bool active experts, called right after layer
        l's router (its output is ``trace``'s entry l)."""
        ...

    def observe(self, selection: BatchSelection) -> None:
        """The batch's full selection (``self(trace, mask)``), once its forward is done."""
        ...


@dataclass(frozen=True)
class LocalTrainingSettings:
    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    aux_loss_coef: float
    seed: int  # seeds batch order (and dropout) of this client in this round
    budget_mode: str = "one-pass"  # budget.mode: "one-pass" or "recompute" (sparse_experts)
    optimizer_state: str = "batch"  # budget.optimizer-state: "batch" or "round"


@dataclass(frozen=True)
class LocalTrainingResult:
    num_examples: int  # |D_c|
    train_loss: float  # mean task loss over the local steps
    trained_experts: torch.Tensor  # (L, S) bool: received a gradient in at least one batch
    usage: torch.Tensor  # (L, S) u_c(e): mean router probability per sample (Eq. 16)
    importance: torch.Tensor | None  # (L, S) s^c(e): batch importance averaged over the round
    max_active_experts_per_batch: int  # max over batches of experts with a gradient
    peak_memory_bytes: int  # measured by the allocator (hfedmoe.measurement.AllocatorPeak)
    mean_step_seconds: float
    local_steps: int = 0  # optimizer steps run (0: the client sat the round out)
    max_experts_with_optimizer_state: int = 0  # measured after every step (budget.optimizer-state)
    # one-pass selection against the exact Eq. 15 set, round means (None: not one-pass):
    selection_overlap: float | None = None  # |chosen ∩ exact| / |exact|
    selection_share: float | None = None  # sum I_b(chosen) / sum I_b(exact)
    # tensor accounting, max over steps (hfedmoe.measurement; 0: not computed)
    peak_memory_estimate_bytes: int = 0
    routing_loss: float | None = None  # mean of the method's routing term (None: it has none)


def skipped_round(num_examples: int, num_layers: int, num_experts: int) -> LocalTrainingResult:
    """The result of a client that does not train this round (e.g. fedavg-drop's weak devices)."""
    zeros = torch.zeros(num_layers, num_experts)
    return LocalTrainingResult(num_examples, 0.0, zeros.bool(), zeros, None, 0, 0, 0.0, 0)


def trains_every_routed_expert(selector: ExpertSelector | None) -> bool:
    """Whether ``selector`` lets every routed expert of every batch learn (None does; a
    selector says so with a true ``trains_every_routed_expert`` attribute): then the plain
    autograd path is exact and cheapest."""
    return selector is None or bool(getattr(selector, "trains_every_routed_expert", False))


def token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B*T,) bool mask of real (non-padding) tokens, row-major like the trace."""
    return attention_mask.reshape(-1).bool()


def sample_probabilities(trace: RoutingTrace, attention_mask: torch.Tensor) -> torch.Tensor:
    """G_e(x_i) per sample: mean of its non-padding tokens' router probabilities.

    Returns (L, B', S), detached (method.md, decision on text samples), over the B' <= B
    samples with at least one real token: an all-padding row has no routing distribution, and
    counting it as zeros would dilute importance (Eq. 3) and make usage rows (Eq. 16) sum to
    less than 1, which validation rejects as a forgery.
    """
    return torch.stack([layer_sample_probabilities(probs, attention_mask)
                        for probs in trace.probabilities])  # (L, B', S)


def layer_sample_probabilities(probs: torch.Tensor, attention_mask: torch.Tensor
                               ) -> torch.Tensor:
    """:func:`sample_probabilities` of one layer's router probabilities ``probs`` (B*T, S):
    (B', S), detached."""
    return sample_means(probs.detach(), attention_mask)


def sample_means(probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B', S): per sample with at least one real token, the mean of its real tokens' rows of
    ``probs`` (B*T, S), ``attention_mask`` (B, T); attached to the graph of ``probs``. A row
    of a packed batch (mask values 1..k: its examples, hfedmoe.data.packing) holds k samples,
    in row-major order, each its own mean."""
    batch, seq = attention_mask.shape
    per_token = probs.reshape(batch, seq, -1)  # (B, T, S)
    samples = int(attention_mask.amax()) if attention_mask.numel() else 0
    if samples <= 1:  # one sample per row
        mask = attention_mask.to(torch.float32)  # (B, T)
        real = attention_mask.bool().any(dim=1)  # (B,)
        summed = torch.einsum("bts,bt->bs", per_token, mask)[real]  # (B', S)
        return summed / mask[real].sum(dim=1, keepdim=True)
    slots = samples + 1  # segment 0 = padding
    index = (torch.arange(batch, device=attention_mask.device).unsqueeze(1) * slots
             + attention_mask).reshape(-1)  # (B*T,) sample slot of each token
    flat = per_token.reshape(batch * seq, -1)
    summed = flat.new_zeros(batch * slots, flat.shape[1]).index_add(0, index, flat)
    counts = torch.zeros(batch * slots, device=flat.device).index_add(
        0, index, torch.ones(batch * seq, device=flat.device))
    keep = (counts > 0) & (torch.arange(batch * slots, device=flat.device) % slots != 0)
    return summed[keep] / counts[keep].unsqueeze(1)  # (B', S)


def forward_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(input_ids, attention_mask)``, with the ``position_ids`` of a packed batch
    (hfedmoe.data.packing) when it has them: the model's logits."""
    if "position_ids" in batch:
        return model(batch["input_ids"], batch["attention_mask"],
                     position_ids=batch["position_ids"])
    return model(batch["input_ids"], batch["attention_mask"])


def load_balancing_loss(trace: RoutingTrace, attention_mask: torch.Tensor, num_experts: int
                        ) -> torch.Tensor:
    """Switch-Transformer auxiliary loss S * sum_e f_e * P_e, averaged over MoE layers.

    f_e: share of the real tokens' routing slots sent to e; P_e: mean router probability.
    """
    real = token_mask(attention_mask)
    losses = []
    for probs, index in zip(trace.probabilities, trace.top_k_index):
        probs, index = probs[real], index[real]  # (N, S), (N, k)
        counts = torch.zeros(num_experts, device=probs.device)
        valid = index[index < num_experts]
        counts.index_add_(0, valid, torch.ones_like(valid, dtype=counts.dtype))
        share = counts / counts.sum().clamp_min(1.0)
        losses.append(num_experts * torch.sum(share * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def _experts_with_gradient(adapter: MoEAdapter) -> torch.Tensor:
    g = adapter.geometry
    has_grad = torch.zeros(g.num_layers, g.num_experts, dtype=torch.bool)
    for layer in range(g.num_layers):
        for expert in range(g.num_experts):
            params = adapter.expert_parameters(layer, expert).values()
            has_grad[layer, expert] = any(p.grad is not None for p in params)
    return has_grad


def drop_idle_expert_state(optimizer: torch.optim.Optimizer, adapter: MoEAdapter,
                           active: torch.Tensor) -> None:
    """``budget.optimizer-state = "batch"``: forget the AdamW state (moments and step count)
    of every expert not in ``active`` (L, S) bool, the experts that learned in this batch, so
    a client never holds more than C_budget experts' optimizer state (what the cost model of
    hfedmoe.budget charges). An expert that learns again later starts its moments afresh, as
    on its first step (docs/hfedmoe.md, "Optimizer state within the budget")."""
    g = adapter.geometry
    for layer in range(g.num_layers):
        for expert in range(g.num_experts):
            if not bool(active[layer, expert]):
                for param in adapter.expert_parameters(layer, expert).values():
                    optimizer.state.pop(param, None)


def experts_with_optimizer_state(optimizer: torch.optim.Optimizer, adapter: MoEAdapter) -> int:
    """How many experts have AdamW state (moments) in ``optimizer`` now (a measurement)."""
    g = adapter.geometry
    return sum(any(p in optimizer.state for p in adapter.expert_parameters(l, e).values())
               for l in range(g.num_layers) for e in range(g.num_experts))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train_locally(
    adapter: MoEAdapter,
    trainable: list[torch.nn.Parameter],
    data: TokenizedSet,
    settings: LocalTrainingSettings,
    selector: ExpertSelector | None = None,
    loss_fn: TaskLoss = classification_loss,
    routing_loss: RoutingLoss | None = None,
) -> LocalTrainingResult:
    """Run ``settings.local_steps`` optimizer steps on ``data``; see the module docstring.
    ``loss_fn(logits, labels)``: the task's mean batch loss (hfedmoe.tasks);
    ``routing_loss(trace, attention_mask)``: a method's term on the router outputs, added to
    each batch's loss (FedAlign-MoE's routing regulariser; None: none).

    How experts learn (docs/hfedmoe.md, "One-pass budgeted experts"): with no ``selector``,
    or one that :func:`trains_every_routed_expert` (e.g. a budget that covers every expert),
    plain autograd trains every routed expert (the selector still computes importance);
    otherwise ``settings.budget_mode`` "one-pass" lets an :class:`OnlineSelector` pick each
    layer's active experts during the forward, and "recompute" (or a selector that is not
    online) defers the expert backward to the batch's full selection (``BackwardPlan``).
    """
    model, geometry = adapter.model, adapter.geometry
    plain = trains_every_routed_expert(selector)
    online = (not plain and settings.budget_mode == "one-pass"
              and isinstance(selector, OnlineSelector))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # dropout
    optimizer = make_optimizer(trainable, settings.lr, settings.weight_decay)
    meter = SavedActivationMeter(model.parameters())
    if device.type == "cuda":  # the allocator's peak of this client's training, not the process's
        torch.cuda.reset_peak_memory_stats(device)
    # CPU: the allocator's events of one step in steady state (the second: the optimizer
    # state of the first exists), profiled outside the timed steps (profiling costs ~20%)
    measured_step = min(1, settings.local_steps - 1)
    measured_peak = 0
    stream: Iterator[dict[str, torch.Tensor]] = batches(data, settings.batch_size, generator)
    trained = torch.zeros(geometry.num_layers, geometry.num_experts, dtype=torch.bool)
    usage_sum = torch.zeros(geometry.num_layers, geometry.num_experts)
    importance_sum = torch.zeros(geometry.num_layers, geometry.num_experts)
    samples, losses, step_seconds, max_active, peak_grad, peak_state = 0, [], [], 0, 0, 0
    max_with_state = 0  # experts holding AdamW state after a step, max over steps
    closeness: list[tuple[float, float]] = []  # one-pass: (overlap, share) per batch
    routing_terms: list[float] = []  # the method's routing term per batch
    model.train()
    for step in range(settings.local_steps):
        batch = _to_device(next(stream), device)
        mask = batch["attention_mask"]
        allocator = (AllocatorPeak(device, _resident_bytes(model, trainable, optimizer))
                     if step == measured_step and device.type == "cpu" else None)
        start = time.perf_counter()
        with allocator or nullcontext():
            with ExitStack() as stack:
                stack.enter_context(meter.measure())
                trace = stack.enter_context(adapter.trace_routing())
                plan = None
                if online:
                    plan = stack.enter_context(adapter.budgeted_experts(
                        selector.layer_chooser(trace, mask)))
                elif not plain:
                    plan = stack.enter_context(adapter.deferred_expert_backward())
                logits = forward_batch(model, batch)  # (B, C) or (B, T, V)
                task_loss = loss_fn(logits, batch["labels"])
                loss = task_loss
                if settings.aux_loss_coef > 0:
                    aux = load_balancing_loss(trace, mask, geometry.num_experts)
                    loss = loss + settings.aux_loss_coef * aux
                if routing_loss is not None:
                    term = routing_loss(trace, mask)
                    loss = loss + term
                    routing_terms.append(float(term.detach()))
                if selector is not None:
                    selection = selector(trace, mask)
                    importance_sum += selection.importance.cpu()
                    if online:
                        chosen = plan.active(geometry.num_layers, geometry.num_experts)
                        closeness.append(selection_closeness(chosen, selection.active.cpu(),
                                                             selection.score.cpu()))
                        selector.observe(selection)
                    elif not plain:
                        plan.active = selection.active
            loss.backward()
            active_now = _experts_with_gradient(adapter)  # measured, not planned
            peak_grad = max(peak_grad, gradient_bytes(trainable))
            if settings.optimizer_state == "batch" and not plain:  # before the step: never > C
                drop_idle_expert_state(optimizer, adapter, active_now)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if allocator is None or settings.local_steps == 1:  # profiled steps are not timed
            step_seconds.append(time.perf_counter() - start)
        if allocator is not None:
            measured_peak = allocator.peak_bytes
        peak_state = max(peak_state, optimizer_state_bytes(optimizer))  # measured, not timed
        max_with_state = max(max_with_state, experts_with_optimizer_state(optimizer, adapter))
        trained |= active_now
        max_active = max(max_active, int(active_now.sum()))
        sample_probs = sample_probabilities(trace, batch["attention_mask"])  # (L, B', S)
        usage_sum += sample_probs.sum(dim=1).cpu()
        samples += sample_probs.shape[1]
        losses.append(float(task_loss.detach()))
    model.eval()
    params = list(model.parameters())
    estimate = tensor_bytes(params) + peak_grad + peak_state + meter.peak_bytes
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
              else measured_peak)
    return LocalTrainingResult(
        num_examples=data.num_examples,
        train_loss=sum(losses) / len(losses),
        trained_experts=trained,
        usage=usage_sum / max(samples, 1),
        importance=None if selector is None else importance_sum / settings.local_steps,
        max_active_experts_per_batch=max_active,
        peak_memory_bytes=int(memory),
        mean_step_seconds=sum(step_seconds) / len(step_seconds),
        local_steps=settings.local_steps,
        max_experts_with_optimizer_state=max_with_state,
        selection_overlap=_mean([c[0] for c in closeness]),
        selection_share=_mean([c[1] for c in closeness]),
        peak_memory_estimate_bytes=int(estimate),
        routing_loss=_mean(routing_terms),
    )


def make_optimizer(trainable: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
                   ) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters with a gradient, no per-tensor temporaries
    of the moments' size) on the devices whose fused kernel torch has (CPU, CUDA); a
    parameter without a gradient is skipped, as by the default implementation."""
    device = trainable[0].device.type if trainable else "cpu"
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay,
                             fused=device in ("cpu", "cuda"))


def _resident_bytes(model: torch.nn.Module, trainable: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer) -> int:
    """Bytes of training state held between steps: parameters, gradients, optimizer state."""
    return (tensor_bytes(model.parameters()) + gradient_bytes(trainable)
            + optimizer_state_bytes(optimizer))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def routing_counts(adapter: MoEAdapter, data: TokenizedSet, batch_size: int) -> torch.Tensor:
    """Activation frequency of every expert on ``data`` under the current model: (L, S) int64,
    the number of top-k routing slots of real (non-padding) tokens sent to each expert.

    Forward only (no gradient, no training), one pass in order; dropped slots (value S) are
    not counted. Used by methods that choose experts from activation statistics.
    """
    model, geometry = adapter.model, adapter.geometry
    device = next(model.parameters()).device
    model.eval()
    counts = torch.zeros(geometry.num_layers, geometry.num_experts, dtype=torch.int64)
    for batch in eval_batches(data, batch_size):
        batch = _to_device(batch, device)
        with adapter.trace_routing() as trace:
            forward_batch(model, batch)
        counts += trace_counts(trace, batch["attention_mask"], geometry.num_experts)
    return counts


def trace_counts(trace: RoutingTrace, attention_mask: torch.Tensor, num_experts: int
                 ) -> torch.Tensor:
    """(L, S) int64: top-k routing slots of the real tokens of one batch sent to each expert
    (dropped slots, value S, are not counted)."""
    real = token_mask(attention_mask)  # (B*T,)
    rows = []
    for index in trace.top_k_index:
        chosen = index[real].reshape(-1).cpu()  # (N*k,)
        rows.append(torch.bincount(chosen[chosen < num_experts], minlength=num_experts))
    return torch.stack(rows).to(torch.int64)
