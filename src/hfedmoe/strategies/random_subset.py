"""``random-subset``: each batch, a uniformly random subset of the routed experts, as large as
the client's budget, back-propagates (same budgeted backward as HFedMoE); the client uploads the
experts it trained, its routers and other trainables; the server averages every tensor by
|D_c| over the clients that sent it (per-expert FedAvg: an expert nobody trained keeps its
value). The baseline that isolates HFedMoE's *choice* of experts from its budget mechanics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from hfedmoe.aggregation import Aggregation, ClientUpdate, State, fedavg_aggregation, fold
from hfedmoe.importance import routed_experts
from hfedmoe.model.adapter import MoEGeometry, RoutingTrace
from hfedmoe.model.state import expert_of
from hfedmoe.selection import BatchSelection, LayerQuotas, select_active_experts, top_in_layer
from hfedmoe.strategies.base import Diagnostics
from hfedmoe.training import ExpertSelector, LocalTrainingResult, token_mask


@dataclass
class RandomSelector:
    """Uniform random scores -> the top-``budget`` routed experts (a seeded random subset)."""

    budget: int
    num_experts: int
    seed: int
    num_layers: int
    generator: torch.Generator = field(init=False)
    quotas: LayerQuotas = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.quotas = LayerQuotas(self.budget, self.num_layers)

    @property
    def trains_every_routed_expert(self) -> bool:
        return self.budget >= self.num_layers * self.num_experts

    def __call__(self, trace: RoutingTrace, attention_mask: torch.Tensor) -> BatchSelection:
        routed = routed_experts(trace.top_k_index, token_mask(attention_mask), self.num_experts)
        score = torch.rand(routed.shape, generator=self.generator)  # (L, S)
        active = select_active_experts(score, routed.cpu(), self.budget)
        return BatchSelection(active, torch.zeros_like(score), score)

    def layer_chooser(self, trace: RoutingTrace, attention_mask: torch.Tensor
                      ) -> Callable[[int], torch.Tensor]:
        """One pass: each layer a random subset of its routed experts, as many as
        :class:`LayerQuotas` allow (budget split over layers as for HFedMoE)."""
        self.quotas.start_batch()

        def choose(layer: int) -> torch.Tensor:  # (S,) bool
            routed = routed_experts(trace.top_k_index[layer:layer + 1],
                                    token_mask(attention_mask), self.num_experts)[0].cpu()
            score = torch.rand(routed.shape, generator=self.generator)  # (S,)
            return top_in_layer(score, routed, self.quotas.take(layer, int(routed.sum())))

        return choose

    def observe(self, selection: BatchSelection) -> None:
        self.quotas.observe(selection.active)


@dataclass(frozen=True)
class RandomSubsetMethod:
    name: str = "random-subset"

    def participates(self, budget_experts: int, geometry: MoEGeometry) -> bool:
        return True

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        return RandomSelector(budget_experts, geometry.num_experts, seed, geometry.num_layers)

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        return {key: tensor for key, tensor in trained.items()
                if (expert := expert_of(key)) is None or bool(result.trained_experts[expert])}

    def start_aggregation(self, global_state: Mapping[str, torch.Tensor]) -> Aggregation:
        return fedavg_aggregation(global_state)

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        return fold(self.start_aggregation(global_state), updates)
