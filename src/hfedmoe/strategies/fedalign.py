"""``fedalign`` (FedAlign-MoE, Fang et al., arXiv 2603.21276) and ``hfedmoe-align``.

FedAlign-MoE's mechanisms (pure functions and their decisions: :mod:`hfedmoe.alignment`,
docs/fedalign.md):
(a) the gate aggregated row by row with routing-consistency weights w_c(e) = s_c(e) / sum_j s_j(e),
    s_c(e) = |D_c| u_c(e) (``fedalign.gate``);
(b) a routing-distribution regulariser in local training,
    ``fedalign.routing-weight * D(p_c || q)`` (``fedalign.divergence``: KL or JS), q being the
    aligned global routing distribution the server sends with each train instruction
    (``guidance``: the |D_c|-weighted mean of the last aggregated round's usage u_c; none in
    round 1, so round 1 trains without the term);
(c) each expert averaged over its semantically consistent holders only (cosine of update
    directions, adaptive threshold mean - ``fedalign.consistency-beta`` * std;
    ``fedalign.consistency``; our optional floor ``fedalign.consistency-floor`` above which a
    holder is always kept, off at 1.0). An expert none of whose holders is kept keeps its value.

``fedalign``: every client trains every routed expert (FedAlign-MoE has no budgets, like
fedavg: budgets are reported but not kept) and uploads all its trainables; an expert's holders
are the clients that trained it. ``hfedmoe-align``: HFedMoE's client side (importance, IB
selection under the client's budget, sparse upload of trained experts in S_c) with FedAlign's
server side and regulariser; holders are those HFedMoE's Eq. 17 counts (uploaded, in S_c).
With a mechanism switched off, hfedmoe-align falls back to HFedMoE's own: gate by Eqs. 19-21,
experts by Eq. 17, no regulariser; with all three off it is ``hfedmoe`` exactly (a test).
Other trainables (``shared.*``): FedAvg by |D_c| in both.
Diagnostics per round: ``excluded`` ([layer, expert, client] left out by (c)),
``experts_aggregated``, ``routing_target_entropy`` (mean over layers of H(q_l), nats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from hfedmoe.aggregation import (
    ClientUpdate,
    State,
    aggregate_experts,
    aggregate_gates,
    dominant_experts,
    fedavg,
    gate_weights,
    split_kind,
)
from hfedmoe.alignment import (
    aggregate_consistent_experts,
    aggregate_gates_per_expert,
    batch_routing_distribution,
    gate_row_weights,
    routing_divergence,
    routing_target,
    trained_updates,
)
from hfedmoe.model.adapter import MoEGeometry, RoutingTrace
from hfedmoe.model.state import EXPERT, ROUTER, SHARED
from hfedmoe.strategies.base import Diagnostics, Guidance, RoutingLoss
from hfedmoe.strategies.hfedmoe import HFedMoEMethod
from hfedmoe.training import ExpertSelector, LocalTrainingResult

ROUTING_TARGET = "routing-target"  # guidance key: (L, S) aligned global routing distribution


@dataclass(frozen=True)
class FedAlignMethod:
    name: str = "fedalign"
    divergence: str = "kl"  # fedalign.divergence: "kl" | "js"
    routing_weight: float = 0.1  # fedalign.routing-weight; 0: no regulariser (ablation)
    gate: bool = True  # fedalign.gate: per-expert routing-consistency gate (a)
    consistency: bool = True  # fedalign.consistency: consistent holders only (c)
    consistency_beta: float = 0.5  # fedalign.consistency-beta
    consistency_floor: float = 1.0  # fedalign.consistency-floor; 1.0: the paper's rule alone
    budgeted: HFedMoEMethod | None = None  # hfedmoe-align: HFedMoE's client side

    # --- client side ---------------------------------------------------------------
    def participates(self, budget_experts: int, geometry: MoEGeometry) -> bool:
        return True

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        if self.budgeted is None:
            return None
        return self.budgeted.selector(budget_experts, geometry, seed)

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        if self.budgeted is None:
            return dict(trained)
        return self.budgeted.upload(trained, result)

    def routing_loss(self, guidance: Mapping[str, torch.Tensor], geometry: MoEGeometry
                     ) -> RoutingLoss | None:
        """(b): ``routing_weight * D(p_batch || q)`` with q = ``guidance["routing-target"]``;
        None when the weight is 0 or the server sent no target (round 1). Raises ValueError
        when the target is not (L, S) rows of probabilities."""
        if self.routing_weight <= 0 or ROUTING_TARGET not in guidance:
            return None
        target = guidance[ROUTING_TARGET].float()
        shape = (geometry.num_layers, geometry.num_experts)
        if tuple(target.shape) != shape or not bool(torch.isfinite(target).all()) or \
                bool((target < 0).any()) or \
                not torch.allclose(target.sum(dim=1), torch.ones(shape[0]), atol=1e-3):
            raise ValueError(f"the routing target is not {shape} rows of probabilities")
        weight, kind = self.routing_weight, self.divergence

        def loss(trace: RoutingTrace, attention_mask: torch.Tensor) -> torch.Tensor:
            local = batch_routing_distribution(trace.probabilities, attention_mask)  # (L, S)
            return weight * routing_divergence(local, target, kind)

        return loss

    # --- server side ---------------------------------------------------------------
    def guidance(self, updates: Sequence[ClientUpdate]) -> Guidance:
        """What the server sends every client with the next round: q (routing_target)."""
        if self.routing_weight <= 0 or not trained_updates(updates):
            return {}
        return {ROUTING_TARGET: routing_target(updates)}

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        trained = trained_updates(updates)
        holders = self._holders(trained)
        experts = split_kind(global_state, EXPERT)
        if self.consistency or self.budgeted is None:
            step = self.budgeted.expert_step if self.budgeted is not None else "holders"
            expert_state, diagnostics = aggregate_consistent_experts(
                experts, trained, holders, self.consistency_beta, self.consistency, step,
                floor=self.consistency_floor)
        else:  # hfedmoe-align without (c): HFedMoE's Eq. 17 exactly
            expert_state, diagnostics = _hfedmoe_experts(self.budgeted, experts, trained)
        routers = split_kind(global_state, ROUTER)
        if self.gate:
            router_state = aggregate_gates_per_expert(routers, trained, gate_row_weights(trained))
        elif self.budgeted is not None:  # HFedMoE's gate (Eqs. 19-21)
            router_state = aggregate_gates(routers, trained, self._alpha(trained))
        else:  # fedalign without (a): the gate by FedAvg
            router_state = fedavg(routers, trained)
        new_state = {**expert_state, **router_state,
                     **fedavg(split_kind(global_state, SHARED), trained)}
        if trained:
            target = routing_target(trained).double()
            entropy = -(target * target.clamp_min(1e-12).log()).sum(dim=1).mean()
            diagnostics["routing_target_entropy"] = round(float(entropy), 6)
        return {key: new_state[key] for key in global_state}, diagnostics

    def _holders(self, updates: Sequence[ClientUpdate]) -> dict[int, torch.Tensor]:
        """(L, S) bool per client: the experts it may contribute."""
        def trained(u: ClientUpdate) -> torch.Tensor:
            return u.trained if u.trained is not None else torch.ones_like(u.usage, dtype=torch.bool)
        if self.budgeted is None:
            return {u.client_id: trained(u) for u in updates}
        return {u.client_id: dominant_experts(u.usage, self.budgeted.tau) for u in updates}

    def _alpha(self, updates: Sequence[ClientUpdate]) -> dict[int, float]:
        for u in updates:
            if u.importance is None:
                raise ValueError(f"client {u.client_id} sent no round-mean importance s^c(e), "
                                 "HFedMoE's gate needs it")
        dominant = {u.client_id: dominant_experts(u.usage, self.budgeted.tau) for u in updates}
        return gate_weights({u.client_id: u.usage for u in updates},
                            {u.client_id: u.importance for u in updates}, dominant)


def _hfedmoe_experts(method: HFedMoEMethod, experts: Mapping[str, torch.Tensor],
                     updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
    dominant = {u.client_id: dominant_experts(u.usage, method.tau) for u in updates}
    return aggregate_experts(experts, updates, dominant, method.expert_step), {}
