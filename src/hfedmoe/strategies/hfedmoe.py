"""``hfedmoe``: HFedMoE (Fang et al., arXiv 2601.00583), as specified in docs/method.md.

Client, per local batch: importance s(e) (Eqs. 3-5) and IB score I_b(e) = s(e) - beta*KL_e
(Eqs. 10, 11, 14) from the router probabilities of the same forward pass; the active set is
the top-C_budget routed experts by I_b (Eq. 15); only those back-propagate. With
``budget.mode = "one-pass"`` (the default) each layer takes its top experts right after its
router, under per-layer quotas from the previous batch's exact Eq. 15 set
(:class:`TraceSelector`, :class:`hfedmoe.selection.LayerQuotas`).
Client, end of round: usage u_c (Eq. 16), S_c = {e : u_c(e) >= tau}; uploads the experts it
trained this round AND that are in S_c, its routers and its other trainables, plus u_c and the
round-mean importance s^c.
Server: experts by Eq. 17 over the clients that uploaded them (others keep their value),
routers by Eq. 21 with alpha (Eqs. 19-20) normalised, other trainables FedAvg by |D_c|.
Diagnostics per round: alpha(c), r(c) (Eq. 18), |S_c| per layer and |S_global|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from hfedmoe.aggregation import (
    Aggregation,
    ClientUpdate,
    HFedMoEAggregation,
    State,
    dominant_experts,
    fedavg_aggregation,
    fold,
)
from hfedmoe.importance import expert_importance, ib_score, routed_experts, routing_kl
from hfedmoe.model.adapter import MoEGeometry, RoutingTrace
from hfedmoe.model.state import expert_of
from hfedmoe.selection import BatchSelection, IBSelector, LayerQuotas, top_in_layer
from hfedmoe.strategies.base import Diagnostics
from hfedmoe.training import (
    ExpertSelector,
    LocalTrainingResult,
    layer_sample_probabilities,
    sample_probabilities,
    token_mask,
)


@dataclass(frozen=True)
class TraceSelector:
    """Adapts the pure IB selection to the training loop's (trace, attention_mask) call.

    Called after the forward: the exact Eq. 15 set over all layers (and the batch's
    importance). One-pass (:class:`hfedmoe.training.OnlineSelector`): each layer takes its
    top experts by I_b under :class:`LayerQuotas` (our decision for Eq. 15 in one pass), and
    the exact set of the batch sets the next batch's quotas."""

    selector: IBSelector
    num_experts: int
    quotas: LayerQuotas

    @property
    def trains_every_routed_expert(self) -> bool:
        """A budget (and per-layer cap) that covers every expert: Eq. 15 keeps all routed."""
        cap = self.selector.per_layer_budget
        return (self.selector.budget >= len(self.quotas.quota) * self.num_experts
                and (cap is None or cap >= self.num_experts))

    def __call__(self, trace: RoutingTrace, attention_mask: torch.Tensor) -> BatchSelection:
        probs = sample_probabilities(trace, attention_mask)  # (L, B', S) real samples
        routed = routed_experts(trace.top_k_index, token_mask(attention_mask), self.num_experts)
        return self.selector(probs, routed)

    def layer_chooser(self, trace: RoutingTrace, attention_mask: torch.Tensor
                      ) -> Callable[[int], torch.Tensor]:
        self.quotas.start_batch()
        lam, beta = self.selector.lam, self.selector.beta

        def choose(layer: int) -> torch.Tensor:  # (S,) bool
            probs = layer_sample_probabilities(trace.probabilities[layer], attention_mask)
            probs = probs.unsqueeze(0)  # (1, B', S): one layer for the pure functions
            routed = routed_experts(trace.top_k_index[layer:layer + 1],
                                    token_mask(attention_mask), self.num_experts)[0].cpu()
            importance = expert_importance(probs, lam)  # (1, S)
            kl = routing_kl(probs) if beta > 0 else torch.zeros_like(importance)
            score = ib_score(importance, kl, beta)[0].cpu()  # (S,)
            return top_in_layer(score, routed, self.quotas.take(layer, int(routed.sum())))

        return choose

    def observe(self, selection: BatchSelection) -> None:
        self.quotas.observe(selection.active)


@dataclass(frozen=True)
class HFedMoEMethod:
    lam: float  # Eq. 5
    beta: float  # Eq. 14
    tau: float  # Eq. 16
    per_layer_budget: int | None = None
    name: str = "hfedmoe"
    sparse_upload: bool = True  # False: upload every trainable tensor (ablation)
    expert_aggregation: str = "sparse"  # "sparse" (Eq. 17) or "fedavg" (ablation)
    gate_weighting: str = "importance"  # "importance" (Eqs. 19-21) or "examples" (ablation)
    expert_step: str = "holders"  # hfedmoe.expert-step: "holders" (Eq. 17) or "data-share"

    def participates(self, budget_experts: int, geometry: MoEGeometry) -> bool:
        return True

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        return TraceSelector(IBSelector(self.lam, self.beta, budget_experts,
                                        self.per_layer_budget), geometry.num_experts,
                             LayerQuotas(budget_experts, geometry.num_layers,
                                         self.per_layer_budget))

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        if not self.sparse_upload:
            return dict(trained)
        keep = result.trained_experts & dominant_experts(result.usage, self.tau)  # (L, S)
        upload = {}
        for key, tensor in trained.items():
            expert = expert_of(key)
            if expert is None or bool(keep[expert]):
                upload[key] = tensor
        return upload

    def start_aggregation(self, global_state: Mapping[str, torch.Tensor]) -> Aggregation:
        if self.expert_aggregation == "fedavg":
            return fedavg_aggregation(global_state)
        return HFedMoEAggregation(global_state, self.tau,
                                  uniform_gate=self.gate_weighting == "examples",
                                  expert_step=self.expert_step)

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        return fold(self.start_aggregation(global_state), updates)
