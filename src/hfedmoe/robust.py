"""Robust aggregation against bad clients: delta clipping and coordinate-wise trimmed mean.

Both run on TENSOR GROUPS, never across the whole model: an expert's tensors form one group
(``expert.<l>.<e>.*``), each router one group (``router.<l>.*``), all other trainables one
group (``shared.*``). An expert's statistics are taken over the clients that trained it only -
an expert trained by 3 clients with 1 attacker is 33% Byzantine even in a 10% Byzantine
federation (docs/reliability.md).

``robust.aggregation`` (one wrapper, ``hfedmoe.strategies.robust.RobustMethod``, applied to
every method in ``hfedmoe.strategies.method_for``):

* ``mean`` - the method's own aggregate, untouched.
* ``clip`` - :func:`clip_deltas` BEFORE the method's weighting: per client and group, the delta
  (upload - global) is scaled down to L2 norm <= bound, bound = ``robust.clip-norm`` or, when
  0, the median of the group's delta norms over its contributors (an expert: the clients that
  trained and uploaded it; a router or ``shared``: every client that uploaded it). The method
  then weights the clipped uploads as usual (HFedMoE: Eq. 17 for experts, alpha of Eqs. 19-21
  for routers - those weights depend on usage and importance, not on the tensors).
* ``trimmed-mean`` - replaces the averaging. For each key, the method's own weight of each
  client w_c(key) (Eq. 17 for experts, alpha(c) of Eqs. 19-20 for HFedMoE's routers, |D_c|
  elsewhere) is measured with :func:`method_weights`; the n clients with w_c(key) > 0 are the
  key's contributors; per coordinate, the floor(trim_fraction * n) smallest and largest values
  are dropped and the rest are averaged with their weights renormalised
  (:func:`weighted_trimmed_mean`). So HFedMoE's gate stays importance-weighted among the
  clients that survive trimming, and an attacker cannot protect an extreme value by claiming a
  large weight (trimming counts clients, not weight). Where the contributors' weights sum to
  s < 1 (``hfedmoe.expert-step = "data-share"``: the rest of the weight stays on the global
  value), the key moves the same fraction s of the way to the trimmed mean.

Degenerate cases (tested): trim count 0 (``trim_fraction * n < 1``, e.g. an expert that only
two clients trained) gives the method's aggregate for that key exactly; a clip bound above
every delta norm gives the method's aggregate exactly; keys nobody contributes keep their
global value (the methods' invariant).

Contract this relies on (every method here satisfies it; :func:`method_weights` raises if
not): a method's ``aggregate`` is, per key, a weighted mean of the uploaded tensors and the
global value (weight 1 - sum of the clients' weights, 0 for all but data-share) whose weights
do not depend on the tensor values.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Callable, Hashable, Mapping, Sequence

import torch

from hfedmoe.aggregation import ClientUpdate, State
from hfedmoe.model.state import EXPERT, ROUTER, parse_key

Aggregate = Callable[[Mapping[str, torch.Tensor], Sequence[ClientUpdate]], tuple[State, dict]]
EXPLAIN_RTOL, EXPLAIN_ATOL = 1e-4, 1e-6  # probed weights must reproduce the float32 aggregate


def group_of(key: str) -> Hashable:
    """The tensor group of a state key: ("expert", l, e), ("router", l) or ("shared",)."""
    parsed = parse_key(key)
    if parsed.kind == EXPERT:
        return (EXPERT, parsed.layer, parsed.expert)
    if parsed.kind == ROUTER:
        return (ROUTER, parsed.layer)
    return (parsed.kind,)


def delta_norms(global_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
                ) -> dict[Hashable, float]:
    """L2 norm of (upload - global) per group, over the uploaded tensors of each group."""
    squares: dict[Hashable, float] = {}
    for key, tensor in state.items():
        group = group_of(key)
        delta = tensor.double() - global_state[key].double()
        squares[group] = squares.get(group, 0.0) + float(delta.pow(2).sum())
    return {group: math.sqrt(value) for group, value in squares.items()}


def _contributes(update: ClientUpdate, group: Hashable) -> bool:
    """An expert group counts only for clients that trained it (when ``trained`` is known)."""
    if group[0] != EXPERT or update.trained is None:
        return True
    return bool(update.trained[group[1], group[2]])


def clip_bounds(norms: Sequence[Mapping[Hashable, float]], updates: Sequence[ClientUpdate],
                clip_norm: float) -> dict[Hashable, float]:
    """Per group: ``clip_norm`` if > 0, else the median delta norm over the contributors."""
    by_group: dict[Hashable, list[float]] = {}
    for update, client_norms in zip(updates, norms):
        for group, norm in client_norms.items():
            if _contributes(update, group):
                by_group.setdefault(group, []).append(norm)
    return {group: clip_norm if clip_norm > 0 else statistics.median(values)
            for group, values in by_group.items()}


def clip_deltas(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                clip_norm: float) -> tuple[list[ClientUpdate], dict[int, int]]:
    """Each client's delta per group scaled to L2 norm <= the group's bound (see
    :func:`clip_bounds`); tensors of unclipped groups are passed on unchanged (same objects).

    Returns the clipped updates and, per client id, how many of its groups were clipped.
    """
    norms = [delta_norms(global_state, update.state) for update in updates]
    bounds = clip_bounds(norms, updates, clip_norm)
    clipped_updates, clipped_count = [], {}
    for update, client_norms in zip(updates, norms):
        factor = {group: bounds[group] / norm for group, norm in client_norms.items()
                  if group in bounds and norm > bounds[group]}
        state = dict(update.state)
        for key, tensor in update.state.items():
            if group_of(key) in factor:
                base = global_state[key].double()
                state[key] = (base + (tensor.double() - base) * factor[group_of(key)]
                              ).to(tensor.dtype)
        clipped_updates.append(replace(update, state=state))
        clipped_count[update.client_id] = len(factor)
    return clipped_updates, clipped_count


def method_weights(aggregate: Aggregate, global_state: Mapping[str, torch.Tensor],
                   updates: Sequence[ClientUpdate], base: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Per key, the (n,) normalised weight the method gives each of ``updates`` (float64).

    Measured, not re-implemented: client j's weights are the aggregate of one-element probes
    (1 for client j's uploaded keys, 0 for everyone else's, 0 as the global value). A key
    nobody contributes gets all-zero weights; weights summing to less than 1 leave the rest on
    the global value. Raises ValueError unless the weights explain ``base``, the method's
    aggregate of the real ``updates`` (``aggregate`` is then not a per-key weighted mean with
    value-independent weights).
    """
    zero = {key: torch.zeros(1, dtype=torch.float64) for key in global_state}
    columns = []
    for j in range(len(updates)):
        probes = [replace(u, state={key: torch.full((1,), float(i == j), dtype=torch.float64)
                                    for key in u.state})
                  for i, u in enumerate(updates)]
        probed, _ = aggregate(zero, probes)
        columns.append({key: float(probed[key]) for key in global_state})
    weights = {key: torch.tensor([column[key] for column in columns], dtype=torch.float64)
               for key in global_state}
    for key, w in weights.items():
        explained = (1.0 - float(w.sum())) * global_state[key].double()
        for i, update in enumerate(updates):
            if w[i] > 0:
                explained = explained + float(w[i]) * update.state[key].double()
        if bool((w < 0).any()) or not torch.allclose(explained, base[key].double(),
                                                     rtol=EXPLAIN_RTOL, atol=EXPLAIN_ATOL):
            raise ValueError(f"the method's aggregate of '{key}' is not a weighted mean of the "
                             "uploads; robust.trimmed-mean needs one")
    return weights


def weighted_trimmed_mean(values: torch.Tensor, weights: torch.Tensor, trim: int
                          ) -> torch.Tensor:
    """Coordinate-wise: drop the ``trim`` smallest and largest of the n values, average the
    rest with their ``weights`` (renormalised). values (n, ...), weights (n,) > 0;
    0 <= trim < n / 2. Ties are broken by client order (stable sort)."""
    n = values.shape[0]
    if not 0 <= 2 * trim < n:
        raise ValueError(f"cannot trim {trim} values at each end of {n}")
    order = torch.sort(values, dim=0, stable=True).indices[trim:n - trim]  # (n - 2 trim, ...)
    kept = torch.gather(values, 0, order)
    w = weights.reshape(-1, *([1] * (values.dim() - 1))).expand_as(values)  # (n, ...)
    kept_w = torch.gather(w, 0, order)
    return (kept * kept_w).sum(dim=0) / kept_w.sum(dim=0)


def trimmed_mean(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                 base: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                 trim_fraction: float) -> tuple[State, int]:
    """``base`` (the method's aggregate) with, for every key, a coordinate-wise weighted
    trimmed mean over the clients of positive ``weights[key]`` (from :func:`method_weights`).

    A key with trim count floor(trim_fraction * n) = 0 keeps its ``base`` value. Contributors'
    weights summing to s < 1 move the key the fraction s of the way from its global value to
    the trimmed mean. Returns the new state and the number of keys where values were trimmed.
    """
    new_state, trimmed_keys = {key: base[key] for key in global_state}, 0
    for key, current in global_state.items():
        contributors = [i for i, w in enumerate(weights[key].tolist()) if w > 0]
        trim = math.floor(trim_fraction * len(contributors))
        if trim == 0:
            continue  # nothing to trim: the method's own value (exactly)
        values = torch.stack([updates[i].state[key].double() for i in contributors])
        result = weighted_trimmed_mean(values, weights[key][contributors], trim)
        share = min(1.0, float(weights[key][contributors].sum()))  # 1 but for data-share
        result = current.double() + share * (result - current.double())
        new_state[key] = result.to(current.dtype)
        trimmed_keys += 1
    return new_state, trimmed_keys
