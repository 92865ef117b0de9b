"""Validation of one training reply against what the server knows (pure: no Flower types).

Stock aggregators check nothing (docs/reliability.md): one NaN, a huge ``num-examples`` or a
forged usage vector decides the global model. Here every decoded reply is checked BEFORE any
arithmetic; a reply that fails a check is rejected as a whole with one reason (the first
failed check) and the round aggregates the others - the aggregate then equals, exactly, the
aggregate of the valid replies alone.

Checks (:func:`check_reply`, in this order):

1. metrics: every reply metric finite; integer metrics integral; ``local-steps`` in
   [0, train.local-steps]; ``num-examples`` >= 1 (0 only with ``local-steps`` = 0) and <= the
   client's training-set size as the server computes it (``data.client_split_sizes``);
   ``budget-experts`` in [top-k, L*S]; ``client-id`` in [0, num-clients);
2. routing statistics: ``usage`` in [0, 1] with every layer's row summing to 1 or 0
   (+-1e-3), ``importance`` finite in [0, 1] and present whenever a budgeted method trained
   (every selector reports it; HFedMoE's gate weights need it);
3. tensors: known keys only, the global tensor's shape and dtype (float32), finite values;
4. unplanned experts: an uploaded expert whose ``trained`` flag is 0 must be bit-identical to
   its global value (a dense upload, e.g. FedAvg's, carries untrained experts unchanged: an
   expert without gradient keeps its value exactly, see hfedmoe.model.adapter); a client with
   ``local-steps`` = 0 may change no tensor and train no expert;
5. budget honesty (what the server can know): ``max-active-experts-per-batch`` <= the number
   of trained experts; for methods that keep every batch within the budget (planning
   methods, and methods whose ``selector`` is not None: all but the fedavg family) also
   ``max-active-experts-per-batch`` <= ``budget-experts`` and trained experts <=
   ``local-steps`` * ``budget-experts`` (the union over the round's batches);
6. update norm: with ``federation.max-update-norm`` > 0, the L2 norm of (upload - global) over
   every uploaded tensor is at most that bound.

:func:`check_identity` (stateful across rounds, so the caller passes the state): a node keeps
the client id it first replied with, an id belongs to one node among those sampled in the
round, and no id replies twice in a round. A rejected reply is recorded under :func:`blamed_client`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, AbstractSet, Mapping, Sequence

import torch

from hfedmoe.aggregation import ClientUpdate
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.model.state import expert_of
from hfedmoe.strategies.base import Method, PlanningMethod
from hfedmoe.strategies.robust import unwrapped

if TYPE_CHECKING:
    from hfedmoe.config import RunConfig

INTEGER_METRICS = ("num-examples", "client-id", "budget-experts",
                   "max-active-experts-per-batch", "peak-memory-bytes",
                   "peak-memory-estimate-bytes", "local-steps")
ROW_SUM_TOLERANCE = 1e-3  # |sum_e u_c(e) - 1| of one layer (float32 means of probabilities)


@dataclass(frozen=True)
class ReplyLimits:
    """What the server knows before any reply arrives."""

    geometry: MoEGeometry
    num_clients: int
    local_steps: int  # train.local-steps: the most optimizer steps of one client round
    budgeted: bool  # the method keeps every batch within the client's budget
    client_sizes: tuple[int, ...] | None = None  # |D_c| per client id (None: not checked)
    max_update_norm: float = 0.0  # L2 bound of (upload - global) over one reply; 0 = none

    @classmethod
    def for_run(cls, config: "RunConfig", geometry: MoEGeometry, method: Method,
                client_sizes: Sequence[int] | None) -> "ReplyLimits":
        configured = unwrapped(method)
        budgeted = (isinstance(configured, PlanningMethod)  # plans hold <= budget experts
                    or configured.selector(geometry.total_experts, geometry, 0) is not None)
        return cls(geometry, config.data.num_clients, config.train.local_steps, budgeted,
                   tuple(client_sizes) if client_sizes is not None else None,
                   config.federation.max_update_norm)


def check_identity(node_id: int, client_id: int, client_of: Mapping[int, int],
                   claimed_this_round: AbstractSet[int],
                   sampled: AbstractSet[int] | None = None) -> None:
    """Raise ValueError if node ``node_id`` may not speak for ``client_id``.

    ``client_of``: node id -> the client id each node replied with before;
    ``claimed_this_round``: client ids of the replies already accepted this round;
    ``sampled``: the nodes this round was sent to (None: every node counts as present). A node
    keeps its first id. An id already held by another node that was sent this round stays
    with that node; if the holder was not sent this round (it left, e.g. a SuperNode
    restarted under a new node id), the new node may take the id over.
    """
    earlier = client_of.get(node_id)
    if earlier is not None and earlier != client_id:
        raise ValueError(f"node {node_id} claims client id {client_id} but replied as client "
                         f"{earlier} before")
    holders = [node for node, cid in client_of.items()
               if cid == client_id and node != node_id and (sampled is None or node in sampled)]
    if holders:
        raise ValueError(f"client id {client_id} belongs to node {holders[0]}")
    if client_id in claimed_this_round:
        raise ValueError(f"client id {client_id} already replied this round")


def blamed_client(node_id: int, claimed: int, client_of: Mapping[int, int],
                  num_clients: int) -> int:
    """The client id a rejected reply is recorded under: the node's known id, else the id it
    claims if that id is valid and no node has held it (never blame another client), else
    -1."""
    if node_id in client_of:
        return client_of[node_id]
    if 0 <= claimed < num_clients and claimed not in client_of.values():
        return claimed
    return -1


def check_reply(update: ClientUpdate, global_state: Mapping[str, torch.Tensor],
                limits: ReplyLimits) -> None:
    """Raise ValueError naming the first problem of ``update`` (see the module docstring)."""
    _check_metrics(update, limits)
    _check_routing(update, limits)
    check_tensors(update.state, global_state)
    _check_unplanned(update, global_state)
    _check_budget(update, limits)
    if limits.max_update_norm > 0:
        norm = update_norm(update.state, global_state)
        if norm > limits.max_update_norm:
            raise ValueError(f"update norm {norm:.4g} exceeds federation.max-update-norm = "
                             f"{limits.max_update_norm:g}")


def check_tensors(state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
                  ) -> None:
    """Every uploaded tensor: a known key, the global tensor's shape and dtype, finite values."""
    for key, tensor in state.items():
        if key not in global_state:
            raise ValueError(f"unknown tensor '{key}'")
        expected = global_state[key]
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(f"'{key}' has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected.shape)}")
        if tensor.dtype != expected.dtype:
            raise ValueError(f"'{key}' has dtype {tensor.dtype}, expected {expected.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"'{key}' has non-finite values")


def update_norm(state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
                ) -> float:
    """L2 norm of (upload - global) over every uploaded tensor (float64)."""
    squares = sum(float((state[k].double() - global_state[k].double()).pow(2).sum())
                  for k in state)
    return math.sqrt(squares)


def _check_metrics(update: ClientUpdate, limits: ReplyLimits) -> None:
    m = update.metrics
    for key, value in m.items():
        if not math.isfinite(value):
            raise ValueError(f"metric '{key}' = {value} is not finite")
        if key in INTEGER_METRICS and value != int(value):
            raise ValueError(f"metric '{key}' = {value} is not an integer")
        if value < 0:
            raise ValueError(f"metric '{key}' = {value} is negative")
    g, steps = limits.geometry, int(m["local-steps"])
    if not 0 <= update.client_id < limits.num_clients:
        raise ValueError(f"client id {update.client_id} is outside [0, {limits.num_clients})")
    if steps > limits.local_steps:
        raise ValueError(f"local-steps = {steps} exceeds train.local-steps = {limits.local_steps}")
    if update.num_examples < (1 if steps > 0 else 0):
        raise ValueError(f"num-examples = {update.num_examples} after {steps} local steps")
    if limits.client_sizes is not None:
        size = limits.client_sizes[update.client_id]
        if update.num_examples > size:
            raise ValueError(f"num-examples = {update.num_examples} exceeds client "
                             f"{update.client_id}'s {size} training examples")
    budget = int(m["budget-experts"])
    if not g.top_k <= budget <= g.total_experts:
        raise ValueError(f"budget-experts = {budget} is outside [top-k = {g.top_k}, "
                         f"{g.total_experts} experts]")


def _check_routing(update: ClientUpdate, limits: ReplyLimits) -> None:
    shape = (limits.geometry.num_layers, limits.geometry.num_experts)
    usage = update.usage.double()  # (L, S)
    if tuple(usage.shape) != shape:
        raise ValueError(f"usage has shape {tuple(usage.shape)}, expected {shape}")
    if not bool(torch.isfinite(usage).all()) or bool((usage < 0).any() | (usage > 1).any()):
        raise ValueError("usage has values outside [0, 1]")
    rows = usage.sum(dim=1)  # (L,)
    if not bool(((rows - 1).abs() <= ROW_SUM_TOLERANCE).logical_or(rows.abs() <= 1e-6).all()):
        raise ValueError(f"usage rows sum to {[round(float(r), 4) for r in rows]}, "
                         "expected 1 (or 0)")
    importance = update.importance
    if importance is None and limits.budgeted and update.metrics["local-steps"] > 0:
        raise ValueError("reply lacks the round-mean importance s^c(e) of its selected experts")
    if importance is not None:
        if tuple(importance.shape) != shape:
            raise ValueError(f"importance has shape {tuple(importance.shape)}, expected {shape}")
        if not bool(torch.isfinite(importance).all()) or \
                bool((importance < 0).any() | (importance > 1).any()):
            raise ValueError("importance has values outside [0, 1]")
    if update.trained is not None and tuple(update.trained.shape) != shape:
        raise ValueError(f"trained has shape {tuple(update.trained.shape)}, expected {shape}")


def _check_unplanned(update: ClientUpdate, global_state: Mapping[str, torch.Tensor]) -> None:
    steps = int(update.metrics["local-steps"])
    trained = update.trained
    if steps == 0 and trained is not None and bool(trained.any()):
        raise ValueError("reports trained experts after 0 local steps")
    for key, tensor in update.state.items():
        address = expert_of(key)
        untrained = steps == 0 or (address is not None and trained is not None
                                   and not bool(trained[address]))
        if untrained and not torch.equal(tensor, global_state[key]):
            what = f"expert {address}" if address is not None else f"'{key}'"
            raise ValueError(f"{what} was changed but not trained this round (unplanned update)")


def _check_budget(update: ClientUpdate, limits: ReplyLimits) -> None:
    m = update.metrics
    budget, steps = int(m["budget-experts"]), int(m["local-steps"])
    max_active = int(m["max-active-experts-per-batch"])
    trained = int(update.trained.sum()) if update.trained is not None else None
    if trained is not None and max_active > trained:
        raise ValueError(f"max-active-experts-per-batch = {max_active} exceeds the "
                         f"{trained} experts reported trained")
    if not limits.budgeted:
        return
    if max_active > budget:
        raise ValueError(f"max-active-experts-per-batch = {max_active} exceeds budget-experts"
                         f" = {budget}")
    if trained is not None and trained > steps * budget:
        raise ValueError(f"{trained} experts trained in {steps} steps exceed "
                         f"budget-experts = {budget} per step")
