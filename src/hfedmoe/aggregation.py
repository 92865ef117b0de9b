"""Aggregation of sparse client updates (pure: tensors in, tensors out).

A client update is a mapping from flat state keys (see ``hfedmoe.model.state``) to tensors;
it may hold any subset of the global keys. Invariant of every function here: a key that no
client contributes (or whose contributors all have weight 0) keeps its previous global value -
it is never averaged with zeros.

HFedMoE (method.md sections 3-4): experts by sparsity-aware aggregation over dominant sets
(Eqs. 16-17), routers by importance-weighted aggregation (Eqs. 18-21), every other trainable
(``shared.*``) by FedAvg; :func:`hfedmoe_aggregate` puts them together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from hfedmoe.config import EXPERT_STEPS
from hfedmoe.model.state import EXPERT, ROUTER, SHARED, expert_of, parse_key

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sent back after a local round (decoded, validated)."""

    client_id: int
    num_examples: int  # |D_c|
    state: State  # uploaded tensors only (sparse)
    usage: torch.Tensor  # (L, S) u_c(e), Eq. 16
    metrics: Mapping[str, float]
    importance: torch.Tensor | None = None  # (L, S) round-mean s^c(e) (Eq. 19); HFedMoE only
    trained: torch.Tensor | None = None  # (L, S) bool: experts that got a gradient this round


def weighted_average(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    weight: Callable[[ClientUpdate, str], float],
    total_weight: float | None = None,
) -> State:
    """New global state: per key, the ``weight``-weighted mean over clients that sent it.

    ``weight(update, key)`` must be >= 0; a key whose senders all have weight 0 (or that no
    client sent) keeps its global value. ``total_weight``: normalise by it instead of by the
    senders' weights, the remaining weight going to the global value (as if the clients that
    did not send the key had sent it unchanged).
    """
    new_state: State = {}
    for key, current in global_state.items():
        total = torch.zeros_like(current, dtype=torch.float64)
        weight_sum = 0.0
        for update in updates:
            if key not in update.state:
                continue
            w = float(weight(update, key))
            if w > 0:
                total += w * update.state[key].to(torch.float64)
                weight_sum += w
        if weight_sum > 0 and total_weight is not None:
            total += (total_weight - weight_sum) * current.to(torch.float64)
            weight_sum = total_weight
        new_state[key] = (total / weight_sum).to(current.dtype) if weight_sum > 0 else current.clone()
    return new_state


def fedavg(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> State:
    """FedAvg (McMahan et al.): every key averaged with weights |D_c| over its senders."""
    return weighted_average(global_state, updates, lambda update, _key: update.num_examples)


# --- HFedMoE (method.md sections 3-4) -------------------------------------------------------


def dominant_experts(usage: torch.Tensor, tau: float) -> torch.Tensor:
    """S_c = {e : u_c(e) >= tau}  (Eq. 16), (L, S) bool; ``tau`` must lie in [0, 1]."""
    if not 0.0 <= tau <= 1.0:  # also rejects NaN
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if usage.dim() != 2:
        raise ValueError(f"usage must be (L, S), got shape {tuple(usage.shape)}")
    return usage >= tau


def split_kind(state: Mapping[str, torch.Tensor], kind: str) -> State:
    """The keys of ``state`` of one kind (EXPERT, ROUTER or SHARED)."""
    return {key: value for key, value in state.items() if parse_key(key).kind == kind}


def _by_client(updates: Sequence[ClientUpdate]) -> dict[int, ClientUpdate]:
    by_id = {update.client_id: update for update in updates}
    if len(by_id) != len(updates):
        raise ValueError("two updates carry the same client_id")
    return by_id


def aggregate_experts(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                      dominant: Mapping[int, torch.Tensor], step: str = "holders") -> State:
    """Sparsity-aware expert aggregation (Eq. 17).

    For each ``expert.<l>.<e>.*`` key: the mean of the uploaded tensors with weights
    w_c(e) = |D_c| * 1(e in S_c), normalised over the clients that uploaded the key.
    ``dominant[client_id]`` is S_c as an (L, S) bool. Experts nobody uploaded, or whose
    uploaders all have e outside S_c, keep their global value; non-expert keys are returned
    unchanged.

    ``step = "data-share"`` (an option, not the paper): the expert moves from its global value
    g towards that mean m only by its holders' share of the round's examples,
    g + (sum of w_c(e) / sum of |D_c| over all updates) * (m - g) - what FedAvg gives when
    every non-holder sends g back, at the sparse upload's size (docs/hfedmoe.md).
    """
    if step not in EXPERT_STEPS:
        raise ValueError(f"expert step '{step}' is not one of {', '.join(EXPERT_STEPS)}")
    _by_client(updates)
    for update in updates:
        if update.client_id not in dominant:
            raise ValueError(f"no dominant set S_c for client {update.client_id}")

    def weight(update: ClientUpdate, key: str) -> float:
        address = expert_of(key)
        if address is None:
            return 0.0
        mask = dominant[update.client_id]  # (L, S)
        layer, expert = address
        if not (0 <= layer < mask.shape[0] and 0 <= expert < mask.shape[1]):
            raise ValueError(f"key '{key}' is outside the (L, S) = {tuple(mask.shape)} dominant set")
        return float(update.num_examples) if bool(mask[layer, expert]) else 0.0

    examples = float(sum(update.num_examples for update in updates))
    return weighted_average(global_state, updates, weight,
                            total_weight=examples if step == "data-share" else None)


def routing_consistency(dominant_by_client: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """r(c) = |S_c intersect S_global| / |S_global|, S_global = union_c S_c  (Eq. 18).

    A diagnostic (not part of any weight). r(c) = 0 for every client when S_global is empty.
    """
    if not dominant_by_client:
        return {}
    union = torch.stack([mask.bool() for mask in dominant_by_client.values()]).any(dim=0)  # (L, S)
    size = int(union.sum())
    return {cid: (int((mask.bool() & union).sum()) / size if size else 0.0)
            for cid, mask in dominant_by_client.items()}


def gate_weights(usage_by_client: Mapping[int, torch.Tensor],
                 importance_by_client: Mapping[int, torch.Tensor],
                 dominant_by_client: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """Normalised router weights alpha(c) (Eqs. 19-20).

    p_c(e) = u_c(e) * s^c(e) for e in S_c (Eq. 19); alpha(c) = sum_{e in S_c} p_c(e) / |S_global|
    (Eq. 20); then divided by sum_c alpha(c) so the weights sum to 1 (project decision; the
    common 1/|S_global| cancels). Empty S_c -> 0. If every alpha(c) is 0, all weights are 0 and
    the caller keeps the previous gate.
    """
    if set(usage_by_client) != set(dominant_by_client) or \
            set(importance_by_client) != set(dominant_by_client):
        raise ValueError("usage, importance and dominant sets must cover the same clients")
    if not dominant_by_client:
        return {}
    union = torch.stack([m.bool() for m in dominant_by_client.values()]).any(dim=0)  # (L, S)
    global_size = max(int(union.sum()), 1)
    raw: dict[int, float] = {}
    for cid, mask in dominant_by_client.items():
        usage, importance = usage_by_client[cid], importance_by_client[cid]
        if usage.shape != mask.shape or importance.shape != mask.shape:
            raise ValueError(f"client {cid}: usage {tuple(usage.shape)}, importance "
                             f"{tuple(importance.shape)} and S_c {tuple(mask.shape)} differ")
        preference = usage.double() * importance.double()  # (L, S) p_c(e), Eq. 19
        raw[cid] = float(preference[mask.bool()].sum()) / global_size  # Eq. 20
        if raw[cid] < 0 or not math.isfinite(raw[cid]):
            raise ValueError(f"client {cid}: gate weight {raw[cid]} is not a finite number >= 0")
    total = sum(raw.values())
    return {cid: (value / total if total > 0 else 0.0) for cid, value in raw.items()}


def aggregate_gates(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                    alpha: Mapping[int, float]) -> State:
    """G^{t+1} = sum_c alpha(c) * G_c^t  (Eq. 21) on every ``router.*`` key.

    Weights are renormalised over the clients that uploaded a key (equal to Eq. 21 when every
    client uploads every router and alpha sums to 1). A router whose uploaders all have
    alpha = 0 keeps its global value; non-router keys are returned unchanged.
    """
    for cid, value in alpha.items():
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"gate weight of client {cid} must be a finite number >= 0, got {value}")

    def weight(update: ClientUpdate, key: str) -> float:
        return alpha.get(update.client_id, 0.0) if parse_key(key).kind == ROUTER else 0.0

    return weighted_average(global_state, updates, weight)


def hfedmoe_aggregate(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                      tau: float, uniform_gate: bool = False, expert_step: str = "holders"
                      ) -> tuple[State, dict]:
    """One HFedMoE server step (method.md section 5, step 4).

    Experts by Eq. 17 over S_c = {u_c >= tau} (``expert_step``: see aggregate_experts);
    routers by Eq. 21 with normalised alpha (or, with ``uniform_gate``, alpha proportional to
    |D_c| - an ablation); ``shared.*``
    keys by FedAvg (|D_c|). Every update needs ``importance`` (the round-mean s^c(e)).
    Diagnostics: ``{"dominant_global": |S_global|, "clients": {client_id: {"gate_weight":
    alpha(c), "routing_consistency": r(c), "dominant_per_layer": [|S_c in layer l|, ...]}}}``.
    """
    by_id = _by_client(updates)
    for cid, update in by_id.items():
        if update.importance is None:
            raise ValueError(f"client {cid} sent no round-mean importance s^c(e), HFedMoE needs it")
    dominant = {cid: dominant_experts(u.usage, tau) for cid, u in by_id.items()}
    alpha = gate_weights({cid: u.usage for cid, u in by_id.items()},
                         {cid: u.importance for cid, u in by_id.items()}, dominant)
    if uniform_gate:  # ablation: the gate averaged by |D_c| only
        total = sum(u.num_examples for u in by_id.values())
        alpha = {cid: u.num_examples / total for cid, u in by_id.items()}
    new_state: State = {}
    new_state.update(aggregate_experts(split_kind(global_state, EXPERT), updates, dominant,
                                       expert_step))
    new_state.update(aggregate_gates(split_kind(global_state, ROUTER), updates, alpha))
    new_state.update(fedavg(split_kind(global_state, SHARED), updates))
    consistency = routing_consistency(dominant)
    union = torch.stack(list(dominant.values())).any(dim=0) if dominant else torch.zeros(0)
    diagnostics = {
        "dominant_global": int(union.sum()),
        "clients": {cid: {"gate_weight": alpha[cid], "routing_consistency": consistency[cid],
                          "dominant_per_layer": [int(n) for n in dominant[cid].sum(dim=1)]}
                    for cid in sorted(dominant)},
    }
    return {key: new_state[key] for key in global_state}, diagnostics
