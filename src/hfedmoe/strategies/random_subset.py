"""``random-subset``: each batch, a uniformly random subset of the routed experts, as large as
the client's budget, back-propagates (same budgeted backward as HFedMoE); the client uploads the
experts it trained, its routers and other trainables; the server averages every tensor by
|D_c| over the clients that sent it (per-expert FedAvg: an expert nobody trained keeps its
value). The baseline that isolates HFedMoE's *choice* of experts from its budget mechanics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from hfedmoe.aggregation import ClientUpdate, State, fedavg
from hfedmoe.importance import routed_experts
from hfedmoe.model.adapter import MoEGeometry, RoutingTrace
from hfedmoe.model.state import expert_of
from hfedmoe.selection import BatchSelection, select_active_experts
from hfedmoe.strategies.base import Diagnostics
from hfedmoe.training import ExpertSelector, LocalTrainingResult, token_mask


@dataclass
class RandomSelector:
    """Uniform random scores -> the top-``budget`` routed experts (a seeded random subset)."""

    budget: int
    num_experts: int
    seed: int
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, trace: RoutingTrace, attention_mask: torch.Tensor) -> BatchSelection:
        routed = routed_experts(trace.top_k_index, token_mask(attention_mask), self.num_experts)
        score = torch.rand(routed.shape, generator=self.generator)  # (L, S)
        active = select_active_experts(score, routed.cpu(), self.budget)
        return BatchSelection(active, torch.zeros_like(score), score)


@dataclass(frozen=True)
class RandomSubsetMethod:
    name: str = "random-subset"

    def participates(self, budget_experts: int, geometry: MoEGeometry) -> bool:
        return True

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        return RandomSelector(budget_experts, geometry.num_experts, seed)

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        return {key: tensor for key, tensor in trained.items()
                if (expert := expert_of(key)) is None or bool(result.trained_experts[expert])}

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        return fedavg(global_state, updates), {}
