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
from typing import Callable, Mapping, Protocol, Sequence

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


class RunningMean:
    """The streaming form of :func:`weighted_average`: updates are folded in one at a time
    (``add``), so a server holds the running sums, not every client's upload.

    Per key: sum of w * x and of w in float64, allocated when the first sender with w > 0
    arrives (memory: 8 bytes per uploaded coordinate, whatever the number of clients). The
    result is the same, operation for operation, as the batch form over the same order.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self._global = global_state
        self._sum: dict[str, torch.Tensor] = {}
        self._weight: dict[str, float] = {}

    def add(self, update: ClientUpdate, weight: Callable[[str], float]) -> None:
        """Fold ``update`` in with ``weight(key)`` >= 0 per uploaded key (keys not in the
        global state are ignored; a weight of 0 leaves the key as it was). All or nothing: the
        weights are computed first, so one that raises leaves the sums untouched."""
        weights = {key: float(weight(key)) for key in update.state if key in self._global}
        for key, w in weights.items():
            tensor = update.state[key]
            if w > 0:
                if key not in self._sum:
                    self._sum[key] = torch.zeros_like(self._global[key], dtype=torch.float64)
                    self._weight[key] = 0.0
                self._sum[key].add_(tensor, alpha=w)  # in float64, no temporary copy
                self._weight[key] += w

    def result(self, total_weight: float | None = None,
               keys: Callable[[str], bool] = lambda key: True) -> State:
        """The new state of every global key (``keys`` selects which total_weight applies
        to; see weighted_average)."""
        new_state: State = {}
        for key, current in self._global.items():
            weight_sum = self._weight.get(key, 0.0)
            if weight_sum <= 0:
                new_state[key] = current.clone()
                continue
            total = self._sum[key]
            if total_weight is not None and keys(key):
                total = total + (total_weight - weight_sum) * current.to(torch.float64)
                weight_sum = total_weight
            new_state[key] = (total / weight_sum).to(current.dtype)
        return new_state


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
    did not send the key had sent it unchanged). (:class:`RunningMean` over ``updates``.)
    """
    mean = RunningMean(global_state)
    for update in updates:
        mean.add(update, lambda key, update=update: weight(update, key))
    return mean.result(total_weight)


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
        return expert_weight(key, dominant[update.client_id], update.num_examples)

    examples = float(sum(update.num_examples for update in updates))
    return weighted_average(global_state, updates, weight,
                            total_weight=examples if step == "data-share" else None)


def expert_weight(key: str, dominant: torch.Tensor, num_examples: int) -> float:
    """Eq. 17's weight of one uploaded key: |D_c| * 1(e in S_c) for ``expert.<l>.<e>.*``
    (``dominant``: S_c, (L, S) bool), 0 for any other key. Raises ValueError for an expert
    outside the (L, S) grid."""
    address = expert_of(key)
    if address is None:
        return 0.0
    layer, expert = address
    if not (0 <= layer < dominant.shape[0] and 0 <= expert < dominant.shape[1]):
        raise ValueError(f"key '{key}' is outside the (L, S) = {tuple(dominant.shape)} dominant set")
    return float(num_examples) if bool(dominant[layer, expert]) else 0.0


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
    raw = {cid: _preference(cid, usage_by_client[cid], importance_by_client[cid], mask)
           / global_size for cid, mask in dominant_by_client.items()}  # Eq. 20
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


class Aggregation(Protocol):
    """A server step that takes the round's replies one at a time (streaming): ``add`` each
    valid update as it arrives, then ``finish`` once; the server never holds every upload."""

    def add(self, update: ClientUpdate) -> None: ...

    def finish(self) -> tuple[State, dict]: ...


def fold(aggregation: Aggregation, updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
    """The batch form of a streaming aggregation: every update added in order, then finish."""
    for update in updates:
        aggregation.add(update)
    return aggregation.finish()


class WeightedAggregation:
    """Streaming :func:`weighted_average` with ``weight(update, key)`` (FedAvg and the
    methods that average each key over its senders)."""

    def __init__(self, global_state: Mapping[str, torch.Tensor],
                 weight: Callable[[ClientUpdate, str], float]) -> None:
        self._mean, self._weight = RunningMean(global_state), weight

    def add(self, update: ClientUpdate) -> None:
        self._mean.add(update, lambda key: self._weight(update, key))

    def finish(self) -> tuple[State, dict]:
        return self._mean.result(), {}


def fedavg_aggregation(global_state: Mapping[str, torch.Tensor]) -> WeightedAggregation:
    """Streaming :func:`fedavg`."""
    return WeightedAggregation(global_state, lambda update, _key: update.num_examples)


class HFedMoEAggregation:
    """One HFedMoE server step (method.md section 5, step 4), streaming.

    Experts by Eq. 17 over S_c = {u_c >= tau} (``expert_step``: see aggregate_experts);
    routers by Eq. 21 with alpha (Eqs. 19-20; or, with ``uniform_gate``, alpha proportional to
    |D_c| - an ablation); ``shared.*`` keys by FedAvg (|D_c|). Every update needs
    ``importance`` (the round-mean s^c(e)); ``add`` raises ValueError otherwise, or when a
    client id comes twice. Each router key is a mean weighted by the raw
    sum_{e in S_c} p_c(e): Eq. 20's 1/|S_global| and the normalisation over clients cancel
    in it, so nothing needs every reply before the sums.
    ``finish`` diagnostics: ``{"dominant_global": |S_global|, "clients": {client_id:
    {"gate_weight": alpha(c), "routing_consistency": r(c), "dominant_per_layer": [...]}}}``.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], tau: float,
                 uniform_gate: bool = False, expert_step: str = "holders") -> None:
        if expert_step not in EXPERT_STEPS:
            raise ValueError(f"expert step '{expert_step}' is not one of {', '.join(EXPERT_STEPS)}")
        self._tau, self._uniform_gate, self._step = tau, uniform_gate, expert_step
        self._mean = RunningMean(global_state)
        # per client: |D_c|, u_c, s^c and S_c (small: what the diagnostics need)
        self._seen: dict[int, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def add(self, update: ClientUpdate) -> None:
        cid = update.client_id
        if cid in self._seen:
            raise ValueError("two updates carry the same client_id")
        if update.importance is None:
            raise ValueError(f"client {cid} sent no round-mean importance s^c(e), HFedMoE needs it")
        dominant = dominant_experts(update.usage, self._tau)  # (L, S) S_c, Eq. 16
        gate = (float(update.num_examples) if self._uniform_gate
                else _preference(cid, update.usage, update.importance, dominant))
        examples = update.num_examples

        def weight(key: str) -> float:
            kind = parse_key(key).kind
            if kind == EXPERT:
                return expert_weight(key, dominant, examples)  # Eq. 17
            return gate if kind == ROUTER else float(examples)  # Eq. 21 / FedAvg

        self._mean.add(update, weight)
        self._seen[cid] = (examples, update.usage, update.importance, dominant)

    def finish(self) -> tuple[State, dict]:
        examples = float(sum(n for n, *_ in self._seen.values()))
        state = self._mean.result(examples if self._step == "data-share" else None,
                                  keys=lambda key: parse_key(key).kind == EXPERT)
        dominant = {cid: d for cid, (_, _, _, d) in self._seen.items()}
        if self._uniform_gate:
            alpha = {cid: n / examples for cid, (n, *_) in self._seen.items()}
        else:
            alpha = gate_weights({cid: u for cid, (_, u, _, _) in self._seen.items()},
                                 {cid: s for cid, (_, _, s, _) in self._seen.items()}, dominant)
        consistency = routing_consistency(dominant)
        union = torch.stack(list(dominant.values())).any(dim=0) if dominant else torch.zeros(0)
        return state, {
            "dominant_global": int(union.sum()),
            "clients": {cid: {"gate_weight": alpha[cid], "routing_consistency": consistency[cid],
                              "dominant_per_layer": [int(n) for n in dominant[cid].sum(dim=1)]}
                        for cid in sorted(dominant)},
        }


def _preference(client_id: int, usage: torch.Tensor, importance: torch.Tensor,
                dominant: torch.Tensor) -> float:
    """sum_{e in S_c} u_c(e) * s^c(e) (Eqs. 19-20 before the common 1/|S_global|)."""
    if usage.shape != dominant.shape or importance.shape != dominant.shape:
        raise ValueError(f"client {client_id}: usage {tuple(usage.shape)}, importance "
                         f"{tuple(importance.shape)} and S_c {tuple(dominant.shape)} differ")
    value = float((usage.double() * importance.double())[dominant.bool()].sum())
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"client {client_id}: gate weight {value} is not a finite number >= 0")
    return value


def hfedmoe_aggregate(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                      tau: float, uniform_gate: bool = False, expert_step: str = "holders"
                      ) -> tuple[State, dict]:
    """One HFedMoE server step over a list of updates (:class:`HFedMoEAggregation`)."""
    return fold(HFedMoEAggregation(global_state, tau, uniform_gate, expert_step), updates)
