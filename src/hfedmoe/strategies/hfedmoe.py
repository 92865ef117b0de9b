"""``hfedmoe``: HFedMoE (Fang et al., arXiv 2601.00583), as specified in docs/method.md.

Client, per local batch: importance s(e) (Eqs. 3-5) and IB score I_b(e) = s(e) - beta*KL_e
(Eqs. 10, 11, 14) from the router probabilities of the same forward pass; the active set is
the top-C_budget routed experts by I_b (Eq. 15); only those back-propagate.
Client, end of round: usage u_c (Eq. 16), S_c = {e : u_c(e) >= tau}; uploads the experts it
trained this round AND that are in S_c, its routers and its other trainables, plus u_c and the
round-mean importance s^c.
Server: experts by Eq. 17 over the clients that uploaded them (others keep their value),
routers by Eq. 21 with alpha (Eqs. 19-20) normalised, other trainables FedAvg by |D_c|.
Diagnostics per round: alpha(c), r(c) (Eq. 18), |S_c| per layer and |S_global|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from hfedmoe.aggregation import (
    ClientUpdate,
    State,
    dominant_experts,
    fedavg,
    hfedmoe_aggregate,
)
from hfedmoe.importance import routed_experts
from hfedmoe.model.adapter import MoEGeometry, RoutingTrace
from hfedmoe.model.state import expert_of
from hfedmoe.selection import BatchSelection, IBSelector
from hfedmoe.strategies.base import Diagnostics
from hfedmoe.training import ExpertSelector, LocalTrainingResult, sample_probabilities, token_mask


@dataclass(frozen=True)
class TraceSelector:
    """Adapts the pure IB selection to the training loop's (trace, attention_mask) call."""

    selector: IBSelector
    num_experts: int

    def __call__(self, trace: RoutingTrace, attention_mask: torch.Tensor) -> BatchSelection:
        probs = sample_probabilities(trace, attention_mask)  # (L, B', S) real samples
        routed = routed_experts(trace.top_k_index, token_mask(attention_mask), self.num_experts)
        return self.selector(probs, routed)


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
                                        self.per_layer_budget), geometry.num_experts)

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

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        if self.expert_aggregation == "fedavg":
            return fedavg(global_state, updates), {}
        return hfedmoe_aggregate(global_state, updates, self.tau,
                                 uniform_gate=self.gate_weighting == "examples",
                                 expert_step=self.expert_step)
