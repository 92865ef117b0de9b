"""The contract every federated method implements (client side and server side).

A method is built from the run configuration by :func:`hfedmoe.strategies.method_for`; its
client-side half runs inside the ClientApp, its server-side half inside the strategy. Both
halves take and return plain tensors and dataclasses.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import torch

from hfedmoe.aggregation import ClientUpdate, State
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.training import ExpertSelector, LocalTrainingResult

Diagnostics = dict  # JSON-serialisable per-round diagnostics (see each method's docstring)


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
        """The next global trainable state from one round's replies, and diagnostics."""
        ...
