"""Robust aggregation for every method: a wrapper around the method's server side.

``robust.aggregation`` = ``clip`` or ``trimmed-mean`` wraps the configured method in
:class:`RobustMethod` (``method_for`` does it, for every method); ``mean`` leaves the method
as it is. The client side (participation, plans, selection, upload) is the inner method's.
How each option combines with the method's weighting (HFedMoE's Eq. 17 and Eqs. 19-21
included) is stated in :mod:`hfedmoe.robust`, which holds the pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from hfedmoe.aggregation import ClientUpdate, State
from hfedmoe.config import RobustConfig
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.robust import clip_deltas, method_weights, trimmed_mean
from hfedmoe.strategies.base import (
    ClientPlan,
    Diagnostics,
    Method,
    RoutingProbe,
    plan_round,
)
from hfedmoe.training import ExpertSelector, LocalTrainingResult


@dataclass(frozen=True)
class RobustMethod:
    """``inner`` with robust aggregation on the server side (client side unchanged)."""

    inner: Method
    aggregation: str  # "clip" | "trimmed-mean"
    clip_norm: float = 0.0  # 0: per group, the median delta norm of its contributors
    trim_fraction: float = 0.0

    @property
    def name(self) -> str:
        return self.inner.name

    def participates(self, budget_experts: int, geometry: MoEGeometry) -> bool:
        return self.inner.participates(budget_experts, geometry)

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        return self.inner.selector(budget_experts, geometry, seed)

    def plan(self, budget_experts: int, geometry: MoEGeometry, seed: int, probe: RoutingProbe,
             personal: Mapping[str, torch.Tensor]) -> ClientPlan:
        return plan_round(self.inner, budget_experts, geometry, seed, probe, personal)

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        return self.inner.upload(trained, result)

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        if self.aggregation == "clip":
            clipped, counts = clip_deltas(global_state, updates, self.clip_norm)
            state, diagnostics = self.inner.aggregate(global_state, clipped)
            robust = {"aggregation": "clip", "clipped_groups": counts}
        else:
            base, diagnostics = self.inner.aggregate(global_state, updates)
            weights = method_weights(self.inner.aggregate, global_state, updates, base)
            state, trimmed = trimmed_mean(global_state, updates, base, weights,
                                          self.trim_fraction)
            robust = {"aggregation": "trimmed-mean", "trimmed_keys": trimmed}
        return state, {**diagnostics, "robust": robust}


def robust_method(method: Method, settings: RobustConfig) -> Method:
    """``method`` itself for ``robust.aggregation = "mean"``, else wrapped in RobustMethod."""
    if settings.aggregation == "mean":
        return method
    return RobustMethod(method, settings.aggregation, settings.clip_norm,
                        settings.trim_fraction)


def unwrapped(method: Method) -> Method:
    """The configured method itself, without the robust wrapper (for what the server may
    expect of its clients, e.g. whether they keep to their budgets)."""
    return method.inner if isinstance(method, RobustMethod) else method
