"""``flex``: FLEx (Liu et al., arXiv 2506.00965) under this project's budgets.

FLEx keeps the pretrained MoE experts frozen, aggregates only the shared non-expert
parameters, and personalises each client with one expert per MoE layer grafted from the
pretrained experts, trained locally with a small gate and never shared.

Global model: the routed experts and the routers keep their initial (pretrained) values for the
whole run - nobody uploads them and the server never aggregates them, even if a reply carries
them. The shared non-expert trainables (``shared.*``: whatever ``model.trainable-non-expert``
unfreezes, the classifier head by default) are averaged by |D_c| over all clients.

Client, first round: a forward-only probe of the model over its training split counts each
expert's routing slots; in each MoE layer its most-used expert (ties: lower index) becomes its
personal expert, initialised from the pretrained one - at most C_budget of them (if C_budget <
L, the layers whose top expert has the highest count) - :func:`personal_experts`.
Client, every round: loads the global state, then its personal state (personal experts and
its routers) stored in the node's state; per batch, only the personal experts that the batch
routes to back-propagate (<= C_budget experts learn per batch, the budget every method gets);
routers and shared trainables train too; uploads the shared trainables only; keeps the
personal experts and routers for the next round (Flower's ``context.state``).
Evaluation: the global accuracy measures the shared model with pretrained experts and routers;
the personalised accuracy uses each client's own experts and routers on its own test split.

What is not reproduced, and why:
- Grafting: FLEx builds the personal expert by pruning pretrained experts' components under a
  local reconstruction loss and adds it beside the MoE with its own sigmoid gate. Here the
  personal expert is a full copy of the layer's most-used pretrained expert and sits in that
  expert's routing slot; adding a module beside the MoE would change the model layer of every
  family. The layer's router plays the role of FLEx's local gate, so routers are personal
  (trained locally, never uploaded) rather than shared non-expert parameters.
- The personal experts are chosen once, from the first round's probe, and persist. A client
  not sampled yet has none: its personalised evaluation is the global model's.
- The personal state lives in the node's Flower ``Context`` for one run, and on the client's
  own disk (hfedmoe.personal_store), from which a run resumed from a checkpoint continues it.
- ``selector()`` (no probe, no stored state) applies :func:`personal_experts` to each batch's
  own routing counts; a federated round always plans with the probe / the stored state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from hfedmoe.aggregation import Aggregation, ClientUpdate, State, WeightedAggregation, fold
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.model.state import SHARED, expert_of, parse_key
from hfedmoe.selection import select_active_experts
from hfedmoe.strategies.base import ClientPlan, Diagnostics, RoutingProbe
from hfedmoe.strategies.fedmoe import BatchCountSelector, HeldExpertsSelector
from hfedmoe.training import ExpertSelector, LocalTrainingResult


def personal_experts(counts: torch.Tensor, budget: int) -> torch.Tensor:
    """(L, S) bool: each layer's most-routed expert in ``counts`` (L, S) (ties: lower index),
    keeping the ``budget`` layers whose chosen expert has the highest count (ties: lower layer)."""
    num_layers = counts.shape[0]
    top = torch.zeros(counts.shape, dtype=torch.bool)
    top[torch.arange(num_layers), counts.argmax(dim=1)] = True  # argmax: first maximum
    score = torch.where(top, counts.to(torch.float64), torch.zeros((), dtype=torch.float64))
    return select_active_experts(score, top, budget)


def stored_experts(personal: Mapping[str, torch.Tensor], geometry: MoEGeometry) -> torch.Tensor:
    """(L, S) bool: the experts present in a stored personal state."""
    mask = torch.zeros(geometry.num_layers, geometry.num_experts, dtype=torch.bool)
    for key in personal:
        if (expert := expert_of(key)) is not None:
            mask[expert] = True
    return mask


@dataclass(frozen=True)
class FLExMethod:
    name: str = "flex"

    def participates(self, budget_experts: int, geometry: MoEGeometry) -> bool:
        return True

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        """Without a round plan: :func:`personal_experts` of each batch's own counts."""
        return BatchCountSelector(lambda counts: personal_experts(counts, budget_experts),
                                  geometry.num_experts)

    def plan(self, budget_experts: int, geometry: MoEGeometry, seed: int, probe: RoutingProbe,
             personal: Mapping[str, torch.Tensor]) -> ClientPlan:
        mine = stored_experts(personal, geometry)
        if not bool(mine.any()):
            mine = personal_experts(probe(), budget_experts)
        elif int(mine.sum()) > budget_experts:
            raise ValueError(f"{int(mine.sum())} stored personal experts exceed the budget "
                             f"of {budget_experts}")
        return ClientPlan(HeldExpertsSelector(mine), personal_experts=mine,
                          personal_routers=True)

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        return {key: tensor for key, tensor in trained.items() if parse_key(key).kind == SHARED}

    def start_aggregation(self, global_state: Mapping[str, torch.Tensor]) -> Aggregation:
        def weight(update: ClientUpdate, key: str) -> float:
            return float(update.num_examples) if parse_key(key).kind == SHARED else 0.0

        return WeightedAggregation(global_state, weight)

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        return fold(self.start_aggregation(global_state), updates)
