"""``fedmoe``: FedMoE (Mei et al., arXiv 2408.11304) under this project's budgets.

FedMoE gives each client a sub-MoE found from the experts' observed activation patterns
(stage 1, a heuristic search) and trains the sub-MoEs federatedly with *modular aggregation*:
each expert is averaged only among the clients that hold it (stage 2).

Client, start of each round: a forward-only probe of the current global model over the
client's whole training split counts, per expert, the top-k routing slots of real tokens sent
to it (:func:`hfedmoe.training.routing_counts`). The sub-MoE is the top-C_budget experts by
that count over all MoE layers (ties: lower (layer, expert) first; ``budget.per-layer`` caps
each layer as for the other methods) - :func:`sub_moe`.
Client, each batch: the held experts that the batch routes to back-propagate, no other expert
does (the same budgeted backward as HFedMoE), so at most C_budget experts learn per batch.
Client, end of round: uploads the held experts it trained, its routers and other trainables.
Server: every tensor is averaged with weights |D_c| over the clients that sent it
(:func:`hfedmoe.aggregation.fedavg`): an expert over its holders that trained it (modular
aggregation), routers and shared trainables over all clients; an expert nobody held keeps its
value. Diagnostic per round: ``experts_with_holders`` (experts that at least one client sent).
``selector()`` (no probe available, e.g. a benchmark of one step) applies the same top-C rule
to each batch's own routing counts; a federated round always plans with the probe.

Decisions where the paper is open or does not fit this project's setting:
- The statistic is the current global model's activation count on the client's data, taken
  anew every round, not a one-off search: the sub-MoE follows the model as it trains (our
  stand-in for FedMoE's stage-2 dynamic adjustment; its expert recommendation between clients
  is not reproduced). The probe is forward only; budgets bound the experts that learn.
- The budget is global across layers (C_budget experts in all), like every other method
  here, not a per-layer width.
- Experts outside the sub-MoE still run forward, frozen, when the router picks them: the
  client does not hold a truly smaller model. Budgets constrain training, and every method is
  evaluated on the same full model (FedMoE itself evaluates each client on its sub-MoE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from hfedmoe.aggregation import Aggregation, ClientUpdate, State, fedavg_aggregation, fold
from hfedmoe.importance import routed_experts
from hfedmoe.model.adapter import MoEGeometry, RoutingTrace
from hfedmoe.model.state import expert_of
from hfedmoe.selection import BatchSelection, select_active_experts
from hfedmoe.strategies.base import ClientPlan, Diagnostics, RoutingProbe
from hfedmoe.training import ExpertSelector, LocalTrainingResult, token_mask, trace_counts


def sub_moe(counts: torch.Tensor, budget: int, per_layer_budget: int | None = None
            ) -> torch.Tensor:
    """(L, S) bool: the ``budget`` experts with the most routing slots in ``counts`` (L, S),
    at most ``per_layer_budget`` per layer; ties go to the lower (layer, expert)."""
    everyone = torch.ones(counts.shape, dtype=torch.bool)
    return select_active_experts(counts.to(torch.float64), everyone, budget, per_layer_budget)


@dataclass(frozen=True)
class BatchCountSelector:
    """The rule of a planning method applied to one batch's own routing counts: ``choose``
    maps (L, S) counts to the (L, S) bool experts that may learn (those the batch routes to
    learn). What ``selector()`` returns when no round plan (probe) is available."""

    choose: Callable[[torch.Tensor], torch.Tensor]  # (L, S) int64 counts -> (L, S) bool
    num_experts: int

    def __call__(self, trace: RoutingTrace, attention_mask: torch.Tensor) -> BatchSelection:
        counts = trace_counts(trace, attention_mask, self.num_experts)  # (L, S)
        zeros = torch.zeros(counts.shape)
        return BatchSelection(self.choose(counts) & (counts > 0), zeros, zeros)


@dataclass(frozen=True)
class HeldExpertsSelector:
    """Per batch: the experts of a fixed set that the batch routes to learn, no others."""

    held: torch.Tensor  # (L, S) bool

    @property
    def trains_every_routed_expert(self) -> bool:
        return bool(self.held.all())

    def __call__(self, trace: RoutingTrace, attention_mask: torch.Tensor) -> BatchSelection:
        routed = routed_experts(trace.top_k_index, token_mask(attention_mask),
                                self.held.shape[1]).cpu()  # (L, S) bool
        zeros = torch.zeros(self.held.shape)
        return BatchSelection(self.held & routed, zeros, zeros)

    def layer_chooser(self, trace: RoutingTrace, attention_mask: torch.Tensor
                      ) -> Callable[[int], torch.Tensor]:
        """One pass: layer l's held experts that the batch routes to (exact: the set is fixed
        for the round)."""
        def choose(layer: int) -> torch.Tensor:  # (S,) bool
            routed = routed_experts(trace.top_k_index[layer:layer + 1],
                                    token_mask(attention_mask), self.held.shape[1])[0].cpu()
            return self.held[layer] & routed

        return choose

    def observe(self, selection: BatchSelection) -> None:
        """Nothing to learn across batches: the held set is the round's plan."""


def upload_trained(trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
    """Every non-expert tensor and the experts that got a gradient this round."""
    return {key: tensor for key, tensor in trained.items()
            if (expert := expert_of(key)) is None or bool(result.trained_experts[expert])}


@dataclass(frozen=True)
class FedMoEMethod:
    per_layer_budget: int | None = None
    name: str = "fedmoe"

    def participates(self, budget_experts: int, geometry: MoEGeometry) -> bool:
        return True

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        """Without a round plan: each batch's top-C_budget experts by that batch's counts."""
        return BatchCountSelector(
            lambda counts: sub_moe(counts, budget_experts, self.per_layer_budget),
            geometry.num_experts)

    def plan(self, budget_experts: int, geometry: MoEGeometry, seed: int, probe: RoutingProbe,
             personal: Mapping[str, torch.Tensor]) -> ClientPlan:
        held = sub_moe(probe(), budget_experts, self.per_layer_budget)
        return ClientPlan(HeldExpertsSelector(held))

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        return upload_trained(trained, result)

    def start_aggregation(self, global_state: Mapping[str, torch.Tensor]) -> Aggregation:
        return _ModularAggregation(global_state)

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        return fold(self.start_aggregation(global_state), updates)


class _ModularAggregation:
    """FedAvg over each key's senders (an expert: its holders), counting the experts sent."""

    def __init__(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self._mean = fedavg_aggregation(global_state)
        self._sent: set[tuple[int, int]] = set()

    def add(self, update: ClientUpdate) -> None:
        self._mean.add(update)
        self._sent |= {e for key in update.state if (e := expert_of(key)) is not None}

    def finish(self) -> tuple[State, Diagnostics]:
        state, _ = self._mean.finish()
        return state, {"experts_with_holders": len(self._sent)}
