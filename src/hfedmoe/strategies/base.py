"""The contract every federated method implements (client side and server side).

A method is built from the run configuration by :func:`hfedmoe.strategies.method_for`; its
client-side half runs inside the ClientApp, its server-side half inside the strategy. Both
halves take and return plain tensors and dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from hfedmoe.aggregation import Aggregation, ClientUpdate, State
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.model.state import ROUTER, expert_of, parse_key
from hfedmoe.training import ExpertSelector, LocalTrainingResult, RoutingLoss

Diagnostics = dict  # JSON-serialisable per-round diagnostics (see each method's docstring)
RoutingProbe = Callable[[], torch.Tensor]  # () -> (L, S) activation counts on the client's data
Guidance = dict  # str -> tensor: what a GuidedMethod's server sends every client with a round


@dataclass(frozen=True)
class ClientPlan:
    """A client's decisions for one local round, taken before training.

    The personal part (``personal_experts``, and every router if ``personal_routers``) is the
    client's own state across rounds: never uploaded, loaded over the global state before
    training and before the client's personalised evaluation, stored again after training.
    """

    selector: ExpertSelector | None
    personal_experts: torch.Tensor | None = None  # (L, S) bool; None: no personal expert
    personal_routers: bool = False

    def personal_keys(self, keys: Iterable[str]) -> frozenset[str]:
        """The personal subset of the trainable state ``keys``."""
        mask = self.personal_experts
        return frozenset(key for key in keys
                         if (self.personal_routers and parse_key(key).kind == ROUTER)
                         or (mask is not None and (e := expert_of(key)) is not None
                             and bool(mask[e])))


class Method(Protocol):
    name: str

    # --- client side ---------------------------------------------------------------
    def participates(self, budget_experts: int, geometry: MoEGeometry) -> bool:
        """Whether a client with this budget trains this round (False: it sits it out)."""
        ...

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        """Per-batch choice of the experts that learn under the client's budget
        (None: every routed expert learns). ``seed``: this client's round seed."""
        ...

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        """The tensors a client sends back, chosen from its trainable state ``trained``."""
        ...

    # --- server side ---------------------------------------------------------------
    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        """The next global trainable state from one round's replies, and diagnostics.

        Contract (robust.trimmed-mean relies on it, hfedmoe.robust.method_weights checks it):
        per key, a weighted mean of the uploaded tensors whose weights do not depend on the
        tensor values; a key nobody contributes keeps its global value."""
        ...


@runtime_checkable
class StreamingMethod(Protocol):
    """A method whose server step takes replies one at a time (optional step): the server
    folds each reply in as it arrives and drops its upload (hfedmoe.aggregation.Aggregation);
    its ``aggregate`` is the same step over a list. Methods that need every upload at once
    (FedAlign-MoE's consistency, robust aggregation) do not have it, and the server collects
    their replies (:class:`CollectedAggregation`)."""

    def start_aggregation(self, global_state: Mapping[str, torch.Tensor]) -> Aggregation:
        ...


class CollectedAggregation:
    """The :class:`Aggregation` of a method without streaming: holds the updates, then calls
    ``aggregate`` once."""

    def __init__(self, method: Method, global_state: Mapping[str, torch.Tensor]) -> None:
        self._method, self._global = method, global_state
        self._updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        self._updates.append(update)

    def finish(self) -> tuple[State, Diagnostics]:
        return self._method.aggregate(self._global, self._updates)


def begin_aggregation(method: Method, global_state: Mapping[str, torch.Tensor]) -> Aggregation:
    """The server step of one round as an :class:`Aggregation`: streaming when ``method``
    is a :class:`StreamingMethod`, else collected."""
    if isinstance(method, StreamingMethod):
        return method.start_aggregation(global_state)
    return CollectedAggregation(method, global_state)


@runtime_checkable
class PlanningMethod(Protocol):
    """A method whose client plans its round from more than its budget (optional step):
    ``run_client_round`` calls ``plan`` instead of ``selector`` when a method has it."""

    def plan(self, budget_experts: int, geometry: MoEGeometry, seed: int, probe: RoutingProbe,
             personal: Mapping[str, torch.Tensor]) -> ClientPlan:
        """``probe()``: activation counts of the current model (global state + ``personal``)
        on this client's training data (forward only, run on demand); ``personal``: the
        client's stored personal state (empty in its first round)."""
        ...


@runtime_checkable
class GuidedMethod(Protocol):
    """A method whose server sends clients more than the global state (optional step), e.g.
    FedAlign-MoE's aligned routing distribution: ``guidance`` after each aggregated round
    (sent with the next round's train instructions, kept in checkpoints), ``routing_loss``
    on the client (added to the task loss of every local batch)."""

    def guidance(self, updates: Sequence[ClientUpdate]) -> Guidance:
        """Tensors for the next round, from this round's valid replies ({}: nothing)."""
        ...

    def routing_loss(self, guidance: Mapping[str, torch.Tensor], geometry: MoEGeometry
                     ) -> RoutingLoss | None:
        """The client's extra loss term given the server's ``guidance`` (None: none)."""
        ...


def plan_round(method: Method, budget_experts: int, geometry: MoEGeometry, seed: int,
               probe: RoutingProbe, personal: Mapping[str, torch.Tensor]) -> ClientPlan:
    """A client's plan for one round: ``method.plan`` for a :class:`PlanningMethod`, else its
    per-batch ``selector`` and no personal state (a wrapper forwards ``plan`` through this)."""
    if isinstance(method, PlanningMethod):
        return method.plan(budget_experts, geometry, seed, probe, personal)
    return ClientPlan(method.selector(budget_experts, geometry, seed))
