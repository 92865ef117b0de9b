"""Budgeted choice of the experts that learn from one local batch (Eq. 15; pure).

Eq. 15: E_active(c) = argmax_{A subset of E_union(c), |A| <= C_budget(c)} sum_{e in A} I_b(e).

Exactness. The feasible sets {A subset of E_union : |A| <= budget and, optionally,
|A intersect layer l| <= per_layer_budget for every l} are the independent sets of a truncated
partition matroid. On a matroid the greedy rule - scan experts by decreasing score, keep one
whenever the caps still allow it - returns a maximum-weight basis, so with or without the
per-layer cap the greedy set is an exact argmax of Eq. 15 among the largest feasible sets
(``tests/unit/test_selection.py`` checks it against brute force over all subsets).

Decision (where Eq. 15 and method.md differ): I_b may be negative (s - beta*KL with a large beta).
The literal "<=" argmax would then leave budget unused and drop negative-score experts; method.md
reads Eq. 15 as "the top-C_budget experts of E_union by I_b". We fill the budget: the result
always has min(budget, number of selectable routed experts) members, so a budget >= |E_union|
trains every routed expert and beta only changes the ranking, never how many experts learn.

Ties are broken deterministically: lower (layer, expert) first (row-major order).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hfedmoe.importance import expert_importance, ib_score, routing_kl


def _check_budget(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def select_active_experts(score: torch.Tensor, routed: torch.Tensor, budget: int,
                          per_layer_budget: int | None = None) -> torch.Tensor:
    """E_active (Eq. 15): (L, S) bool, the highest-``score`` routed experts under the caps.

    ``score``: (L, S) finite I_b(e); ``routed``: (L, S) bool E_union. ``budget`` caps the number
    of selected experts over ALL layers; ``per_layer_budget`` (optional) caps each layer.
    Contract: the result is a subset of ``routed``; it has exactly
    min(budget, sum_l min(per_layer_budget, |routed in l|)) members; it maximises the summed
    score among all such sets; ties go to the lower (layer, expert).
    """
    _check_budget("budget", budget)
    _check_budget("per_layer_budget", per_layer_budget)
    if score.dim() != 2 or score.shape != routed.shape:
        raise ValueError(f"score {tuple(score.shape)} and routed {tuple(routed.shape)} must be "
                         "the same (L, S) shape")
    if routed.dtype != torch.bool:
        raise ValueError(f"routed must be a bool tensor, got {routed.dtype}")
    if not bool(torch.isfinite(score[routed]).all()):
        raise ValueError("score must be finite on routed experts")
    num_layers, num_experts = score.shape
    flat_routed = routed.reshape(-1)  # (L*S,)
    candidates = torch.nonzero(flat_routed).reshape(-1)  # (R,) row-major = (layer, expert) order
    # A stable descending sort keeps row-major order among equal scores (the tie rule).
    order = torch.sort(score.reshape(-1)[candidates], descending=True, stable=True).indices
    ranked = candidates[order]  # (R,) flat indices, best first
    if per_layer_budget is not None:
        layer_of = ranked // num_experts  # (R,)
        one_hot = torch.nn.functional.one_hot(layer_of, num_layers)  # (R, L)
        rank_in_layer = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # (R,)
        ranked = ranked[rank_in_layer < int(per_layer_budget)]  # greedy under the per-layer cap
    active = torch.zeros_like(flat_routed)  # (L*S,) bool
    active[ranked[:int(budget)]] = True  # greedy under the global cap
    return active.reshape(num_layers, num_experts)


class BatchSelection(NamedTuple):
    """What the selector decided for one local batch."""

    active: torch.Tensor  # (L, S) bool E_active, Eq. 15
    importance: torch.Tensor  # (L, S) s(e) of this batch, Eq. 5 (for the round mean s^c(e))
    score: torch.Tensor  # (L, S) I_b(e), Eq. 14


@dataclass(frozen=True)
class IBSelector:
    """The per-batch HFedMoE selection (method.md section 5, step 2): (3-5) -> (14) -> (15).

    Call with ``sample_probs`` (L, B, S) and ``routed`` (L, S) bool; needs nothing else.
    """

    lam: float  # lambda of Eq. 5, in [0, 1]
    beta: float  # beta of Eq. 14, >= 0
    budget: int  # C_budget(c), >= 1, over all layers
    per_layer_budget: int | None = None  # optional cap per MoE layer, >= 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {self.lam}")
        if not (self.beta >= 0.0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        _check_budget("budget", self.budget)
        _check_budget("per_layer_budget", self.per_layer_budget)

    def __call__(self, sample_probs: torch.Tensor, routed: torch.Tensor) -> BatchSelection:
        importance = expert_importance(sample_probs, self.lam)  # (L, S)
        kl = routing_kl(sample_probs) if self.beta > 0 else torch.zeros_like(importance)
        score = ib_score(importance, kl, self.beta)  # (L, S)
        active = select_active_experts(score.cpu(), routed.cpu(), self.budget,
                                       self.per_layer_budget)
        return BatchSelection(active, importance, score)


def make_ib_selector(lam: float, beta: float, budget: int,
                     per_layer_budget: int | None = None) -> IBSelector:
    """An :class:`IBSelector`; raises ValueError for lambda outside [0, 1], beta < 0, budget < 1."""
    return IBSelector(lam, beta, budget, per_layer_budget)


# --- one-pass selection: the active set decided layer by layer during the forward -------------

def top_in_layer(score: torch.Tensor, routed: torch.Tensor, count: int) -> torch.Tensor:
    """(S,) bool: the ``count`` highest-``score`` experts among ``routed`` (S,) bool of one
    layer (all routed ones if fewer); ties go to the lower expert index (as in
    :func:`select_active_experts`, which this equals for a single layer)."""
    candidates = torch.nonzero(routed.reshape(-1)).reshape(-1)  # (R,) expert order
    order = torch.sort(score.reshape(-1)[candidates], descending=True, stable=True).indices
    active = torch.zeros_like(routed.reshape(-1))
    active[candidates[order][:max(0, int(count))]] = True
    return active


class LayerQuotas:
    """Per-layer shares of a global budget C for one-pass selection (our decision for Eq. 15,
    docs/hfedmoe.md "One-pass budgeted experts").

    Eq. 15 picks the top-C experts over ALL layers, which is known only after the last
    router; a one-pass forward must decide each layer's active experts right after that
    layer's router. Layer l may take ``quota[l]`` experts plus what earlier layers of the same
    batch left unused (fewer routed experts than their quota), never more than the per-layer
    cap, so a batch never exceeds C. The quotas of a batch are the per-layer counts of the
    previous batch's exact Eq. 15 solution (:meth:`observe`); before any batch, C is split
    evenly (remainder to the first layers). Mutable: one instance per client round.
    """

    def __init__(self, budget: int, num_layers: int, per_layer_budget: int | None = None) -> None:
        _check_budget("budget", budget)
        _check_budget("per_layer_budget", per_layer_budget)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.budget, self.per_layer_budget = int(budget), per_layer_budget
        base, extra = divmod(self.budget, num_layers)
        self.quota = [base + (1 if layer < extra else 0) for layer in range(num_layers)]
        self._carry = 0
        self._taken = 0

    def start_batch(self) -> None:
        """Forget the carry and the count of the previous batch's forward."""
        self._carry, self._taken = 0, 0

    def take(self, layer: int, routed: int) -> int:
        """How many of layer ``layer``'s ``routed`` experts may learn from this batch."""
        allowed = self.quota[layer] + self._carry
        if self.per_layer_budget is not None:
            allowed = min(allowed, self.per_layer_budget)
        count = max(0, min(allowed, routed, self.budget - self._taken))
        self._carry = self.quota[layer] + self._carry - count
        self._taken += count
        return count

    def observe(self, exact_active: torch.Tensor) -> None:
        """Set the next batch's quotas from this batch's exact Eq. 15 solution (L, S) bool."""
        counts = [int(n) for n in exact_active.sum(dim=1)]
        if len(counts) != len(self.quota):
            raise ValueError(f"exact_active has {len(counts)} layers, expected {len(self.quota)}")
        if sum(counts) > 0:
            spare = self.budget - sum(counts)  # unused budget (fewer routed than C) to layer 0
            self.quota = [counts[0] + spare, *counts[1:]]


def selection_closeness(chosen: torch.Tensor, exact: torch.Tensor, score: torch.Tensor
                        ) -> tuple[float, float]:
    """How close a one-pass choice comes to the exact Eq. 15 set, all (L, S): (overlap =
    |chosen ∩ exact| / |exact|, share = sum of I_b⁺ over chosen / sum of I_b⁺ over exact, with
    I_b⁺ = max(I_b, 0), so share >= 0); each 1.0 when its denominator is 0."""
    size = int(exact.sum())
    overlap = float((chosen & exact).sum()) / size if size else 1.0
    positive = score.clamp_min(0.0)
    best = float(positive[exact].sum())
    share = float(positive[chosen].sum()) / best if best > 0 else 1.0
    return overlap, share
