"""FedAlign-MoE's three mechanisms as pure functions (tensors in, tensors out).

FedAlign-MoE (Fang et al., arXiv 2603.21276) aligns what HFedMoE's aggregation leaves open
under non-IID data. Only its abstract and a few formulas are known (method.md); every other
detail here is our decision, stated where it is taken and in docs/fedalign.md.

(a) **Routing-consistency gate aggregation** (:func:`aggregate_gates_per_expert`): row e of a
    layer's router is averaged over the clients with weights
    ``w_c(e) = s_c(e) / sum_j s_j(e)``, where s_c(e) = |D_c| * u_c(e) is client c's *routing
    mass* on expert e (u_c: the mean router probability per sample, Eq. 16 of HFedMoE, so
    s_c(e) is the expected number of c's samples' routing probability on e). A client whose
    data routes to e decides e's row; a client that never routes there has no say in it.
(b) **Routing-distribution regulariser** (:func:`routing_divergence`, used in local training):
    ``D(p_c,l || q_l)`` between the batch's routing distribution p_c,l (mean over real samples
    of their token-mean router probabilities, u_c's definition on one batch) and the aligned
    global one q_l (:func:`routing_target`), averaged over MoE layers; KL(p || q) or
    Jensen-Shannon. A batch-level (marginal) distribution constrains how much each expert is
    used, not which token goes where, so useful local preference survives; KL(p || q) is
    mode-seeking: a client may concentrate on a subset of the experts the federation uses,
    but pays for mass where the federation routes almost nothing.
(c) **Semantic-consistency expert aggregation** (:func:`consistent_holders`,
    :func:`aggregate_consistent_experts`): per expert, the cosine similarity of the holders'
    update directions (upload - global, all the expert's tensors concatenated); client c's
    consistency kappa_c = mean over the other holders of its similarity; the adaptive
    threshold ``tau_e = mean - beta * std`` of the pairwise similarities; holders with
    kappa_c >= tau_e are averaged (|D_c| weights), the others are left out of this expert this
    round. Why update directions: for a linear map W, the output change on isotropic probe
    inputs x is (dW) x, and E_x <dW_c x, dW_d x> is proportional to <dW_c, dW_d>, so the
    cosine of updates is the cosine of the function change (first order, per linear layer);
    it needs no data on the server. It is not invariant to permutations inside an expert
    (FedMA-style matching is not attempted). Our addition, off by default: a floor
    (``fedalign.consistency-floor``, in [-1, 1]) above which a holder is always kept. The
    threshold is relative, so it leaves the least similar copies out even when every copy
    agrees with the others; measured on BBC News at alpha = 0.5 it left out 11-18% of the
    copies a round, in one seed nearly all of one client's (docs/fedalign.md).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from hfedmoe.aggregation import EXPERT_STEPS, ClientUpdate, State, weighted_average
from hfedmoe.model.state import EXPERT, ROUTER, expert_of, parse_key
from hfedmoe.training import sample_means

DIVERGENCES = ("kl", "js")
_EPS = 1e-8  # floor of a probability inside a logarithm


def routing_mass(update: ClientUpdate) -> torch.Tensor:
    """s_c(e) = |D_c| * u_c(e): (L, S) float64, client c's routing mass on each expert."""
    return update.num_examples * update.usage.double()


def trained_updates(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """The updates of clients that trained this round (``local-steps`` > 0)."""
    return [u for u in updates if u.metrics.get("local-steps", 1) > 0]


def routing_target(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """The aligned global routing distribution q: (L, S) float32, rows summing to 1.

    q_l(e) = sum_c |D_c| u_c,l(e) / sum_c |D_c| over the clients that trained this round
    (the routing distribution of the pooled data, each client's share by its data); a row
    whose mass is 0 becomes uniform. Raises ValueError when no update is given.
    """
    trained = trained_updates(updates)
    if not trained:
        raise ValueError("the routing target needs at least one trained update")
    mass = torch.stack([routing_mass(u) for u in trained]).sum(dim=0)  # (L, S)
    rows = mass.sum(dim=1, keepdim=True)
    uniform = torch.full_like(mass, 1.0 / mass.shape[1])
    return torch.where(rows > 0, mass / rows.clamp_min(1e-300), uniform).float()


def routing_divergence(local: torch.Tensor, target: torch.Tensor, kind: str = "kl"
                       ) -> torch.Tensor:
    """Mean over layers of D(local_l || target_l): a scalar tensor, differentiable in ``local``.

    ``local``, ``target``: (L, S) routing distributions (rows sum to 1). ``kind``: "kl" for
    KL(local || target) = sum_e p log(p / q), or "js" for the Jensen-Shannon divergence
    (symmetric, at most log 2). Probabilities are floored at 1e-8 inside logarithms. Zero when
    local == target. Raises ValueError on a shape mismatch or an unknown ``kind``.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence '{kind}' is not one of {', '.join(DIVERGENCES)}")
    if local.shape != target.shape or local.dim() != 2:
        raise ValueError(f"local {tuple(local.shape)} and target {tuple(target.shape)} "
                         "must both be (L, S)")
    target = target.to(local.device, local.dtype)
    if kind == "kl":
        return _kl(local, target).mean()
    middle = 0.5 * (local + target)
    return (0.5 * _kl(local, middle) + 0.5 * _kl(target, middle)).mean()


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(L,) KL(p_l || q_l) of (L, S) rows."""
    return (p * (p.clamp_min(_EPS).log() - q.clamp_min(_EPS).log())).sum(dim=1)


def batch_routing_distribution(probabilities: Sequence[torch.Tensor],
                               attention_mask: torch.Tensor) -> torch.Tensor:
    """p_c: (L, S), the batch's routing distribution per MoE layer, attached to the graph.

    ``probabilities[l]``: (B*T, S) router probabilities of layer l (RoutingTrace);
    ``attention_mask``: (B, T). Per sample, the mean over its real tokens; then the mean over
    the samples with at least one real token (u_c's definition, Eq. 16, on one batch).
    """
    return torch.stack([sample_means(probs, attention_mask).mean(dim=0)
                        for probs in probabilities])  # (L, S)


# --- (a) the gate, row by row ---------------------------------------------------------------


def gate_row_weights(updates: Sequence[ClientUpdate]) -> dict[int, torch.Tensor]:
    """w_c(e) = s_c(e) / sum_j s_j(e) per client: {client_id: (L, S) float64}.

    The sum runs over ``updates``; an expert nobody routes to (all s = 0) gets weight 0 from
    everyone (its router row keeps its global value).
    """
    mass = {u.client_id: routing_mass(u) for u in updates}
    if not mass:
        return {}
    total = torch.stack(list(mass.values())).sum(dim=0)  # (L, S)
    return {cid: torch.where(total > 0, m / total.clamp_min(1e-300), torch.zeros_like(m))
            for cid, m in mass.items()}


def aggregate_gates_per_expert(global_state: Mapping[str, torch.Tensor],
                               updates: Sequence[ClientUpdate],
                               row_weights: Mapping[int, torch.Tensor]) -> State:
    """Every ``router.<l>.*`` key, row e averaged with weights ``row_weights[c][l, e]``.

    A router tensor whose first dimension is S (the weight (S, H), a bias or a score
    correction (S,)) is aggregated row by row, renormalised over the clients that uploaded it;
    a row whose uploaders all have weight 0 keeps its global value. A router tensor without an
    expert axis (e.g. a shared expert's scalar gate) is averaged with each client's weight
    summed over the layer's experts. Non-router keys are returned unchanged.
    """
    new_state: State = {}
    for key, current in global_state.items():
        parsed = parse_key(key)
        if parsed.kind != ROUTER:
            new_state[key] = current
            continue
        senders = [u for u in updates if key in u.state]
        weights = [row_weights[u.client_id][parsed.layer] for u in senders]  # (S,) each
        if current.dim() >= 1 and senders and current.shape[0] == weights[0].shape[0]:
            new_state[key] = _rowwise_mean(current, [u.state[key] for u in senders], weights)
        else:
            layer_weight = {u.client_id: float(w.sum()) for u, w in zip(senders, weights)}
            new_state[key] = weighted_average(
                {key: current}, senders, lambda u, _k: layer_weight[u.client_id])[key]
    return new_state


def _rowwise_mean(current: torch.Tensor, values: Sequence[torch.Tensor],
                  weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row e: sum_c w_c(e) v_c[e] / sum_c w_c(e); rows of weight 0 keep ``current``."""
    w = torch.stack([wc.double() for wc in weights])  # (n, S)
    v = torch.stack([value.double() for value in values])  # (n, S, ...)
    shape = (*w.shape, *([1] * (v.dim() - 2)))
    total = w.sum(dim=0)  # (S,)
    mean = (w.reshape(shape) * v).sum(dim=0) / total.clamp_min(1e-300).reshape(shape[1:])
    keep = (total > 0).reshape(shape[1:])
    return torch.where(keep, mean, current.double()).to(current.dtype)


# --- (c) semantically consistent experts ----------------------------------------------------


def update_direction(update: ClientUpdate, global_state: Mapping[str, torch.Tensor],
                     keys: Sequence[str]) -> torch.Tensor:
    """The client's update of one expert, flattened: (P,) float64 of upload - global."""
    return torch.cat([(update.state[k].double() - global_state[k].double()).reshape(-1)
                      for k in keys])


def pairwise_cosine(directions: torch.Tensor) -> torch.Tensor:
    """(n, n) cosine similarities of the rows of ``directions`` (n, P); a zero row has
    similarity 0 with every other row (and 1 with itself)."""
    norms = directions.norm(dim=1, keepdim=True)  # (n, 1)
    unit = torch.where(norms > 0, directions / norms.clamp_min(1e-300),
                       torch.zeros_like(directions))
    similarity = unit @ unit.T
    similarity.fill_diagonal_(1.0)
    return similarity


def consistent_holders(similarity: torch.Tensor, beta: float, floor: float = 1.0
                       ) -> torch.Tensor:
    """(n,) bool: the holders kept by the adaptive threshold.

    ``similarity``: (n, n) pairwise cosines of the holders' update directions.
    kappa_c = mean_{d != c} sim(c, d); tau = mean - beta * std (population std) of the
    n(n-1)/2 pairwise similarities; kept: kappa_c >= tau (1e-12 slack for rounding) or
    kappa_c >= ``floor`` (1.0, the default: tau alone, FedAlign-MoE's rule). With one or two
    holders everyone is kept (two updates cannot tell which one is off). Since the mean of
    kappa equals the mean pairwise similarity and beta >= 0, at least one holder is kept.
    Raises ValueError for beta < 0 or not finite, or floor outside [-1, 1].
    """
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if not -1 <= floor <= 1:
        raise ValueError(f"floor must be a number in [-1, 1], got {floor}")
    n = similarity.shape[0]
    if n <= 2:
        return torch.ones(n, dtype=torch.bool)
    upper = similarity[torch.triu_indices(n, n, offset=1).unbind()]  # (n(n-1)/2,)
    threshold = upper.mean() - beta * upper.std(unbiased=False)
    kappa = (similarity.sum(dim=1) - similarity.diagonal()) / (n - 1)
    return (kappa >= threshold - 1e-12) | (kappa >= floor)


def aggregate_consistent_experts(global_state: Mapping[str, torch.Tensor],
                                 updates: Sequence[ClientUpdate],
                                 holders: Mapping[int, torch.Tensor], beta: float,
                                 consistency: bool = True, step: str = "holders",
                                 floor: float = 1.0) -> tuple[State, dict]:
    """Every ``expert.<l>.<e>.*`` key: the |D_c|-weighted mean over the consistent holders.

    ``holders[c]``: (L, S) bool, the experts client c may contribute (it trained them; for
    hfedmoe-align also in its dominant set S_c); a holder must have uploaded every tensor of
    the expert. ``beta``, ``floor``: :func:`consistent_holders`. ``consistency`` False: every
    holder is kept (the ablation). An expert with no holder, or none kept, keeps its global
    value. Non-expert keys are returned unchanged.
    ``step = "data-share"`` (hfedmoe-align with ``hfedmoe.expert-step = "data-share"``): the
    expert moves from its global value towards that mean only by the kept holders' share of
    the round's examples, as hfedmoe.aggregation.aggregate_experts does for HFedMoE.
    Diagnostics: ``{"excluded": [[layer, expert, client_id], ...], "experts_aggregated": n}``.
    """
    if step not in EXPERT_STEPS:
        raise ValueError(f"expert step '{step}' is not one of {', '.join(EXPERT_STEPS)}")
    examples = float(sum(u.num_examples for u in updates)) if step == "data-share" else None
    by_expert: dict[tuple[int, int], list[str]] = {}
    for key in global_state:
        address = expert_of(key)
        if address is not None:
            by_expert.setdefault(address, []).append(key)
    new_state: State = {k: v for k, v in global_state.items() if parse_key(k).kind != EXPERT}
    excluded: list[list[int]] = []
    aggregated = 0
    for (layer, expert), keys in sorted(by_expert.items()):
        members = [u for u in updates if bool(holders[u.client_id][layer, expert])
                   and all(k in u.state for k in keys)]
        if consistency and len(members) > 2:
            directions = torch.stack([update_direction(u, global_state, keys) for u in members])
            kept = consistent_holders(pairwise_cosine(directions), beta, floor)
            excluded += [[layer, expert, u.client_id] for u, k in zip(members, kept) if not k]
            members = [u for u, k in zip(members, kept) if k]
        aggregated += bool(members)
        new_state.update(weighted_average({k: global_state[k] for k in keys}, members,
                                          lambda u, _k: float(u.num_examples),
                                          total_weight=examples))
    return ({k: new_state[k] for k in global_state},
            {"excluded": excluded, "experts_aggregated": aggregated})
