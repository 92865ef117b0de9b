"""The round loop: Flower's ``Strategy.start`` order, plus what a long federated run needs.

Per round, like ``Strategy.start``: train instructions out, replies in, ``aggregate_train``;
client-side evaluation (``configure_evaluate``/``aggregate_evaluate``); then the centralised
``evaluate_fn``. Added here (Flower's loop has none of it, see docs/reliability.md):

* **too few replies** - ``aggregate_train`` returns no arrays when fewer than
  ``federation.min-replies`` valid replies arrived; the round is then sent again (``retry``,
  at most ``federation.max-retries`` times) or the global model stays as it is (``skip``);
* **bounded waits** - every ``send_and_receive`` has ``federation.round-timeout``; node
  sampling has its own deadline (``sample_node_ids``);
* **resume** - the loop can start at any round with the arrays of a checkpoint, and calls
  ``after_round`` (the checkpoint writer) once a round is complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hfedmoe.config import FederationConfig
from hfedmoe.heap import return_freed_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundPolicy:
    attempts: int  # sends of one round at most (1 + retries)
    round_timeout: float  # seconds per send_and_receive

    @classmethod
    def from_config(cls, federation: FederationConfig) -> "RoundPolicy":
        retries = federation.max_retries if federation.on_too_few == "retry" else 0
        return cls(attempts=1 + retries, round_timeout=federation.round_timeout)


def run_rounds(strategy: Strategy, grid: Grid, arrays: ArrayRecord, *, first_round: int,
               num_rounds: int, policy: RoundPolicy,
               evaluate_fn: Callable[[int, ArrayRecord], object],
               after_round: Callable[[int, ArrayRecord], None] = lambda r, a: None
               ) -> ArrayRecord:
    """Rounds ``first_round..num_rounds`` from ``arrays``; returns the final global arrays.

    ``first_round == 1`` also evaluates the initial model (round 0).
    """
    strategy.summary()
    if first_round == 1:
        evaluate_fn(0, arrays)
    for server_round in range(first_round, num_rounds + 1):
        for attempt in range(1, policy.attempts + 1):
            aggregated = train_once(strategy, grid, arrays, server_round, policy)
            return_freed_memory()  # the uploads folded in and dropped (hfedmoe.heap)
            if aggregated is not None:
                arrays = aggregated
                break
            log.warning("round %d, attempt %d/%d: too few valid replies", server_round,
                        attempt, policy.attempts)
        else:
            log.warning("round %d skipped: the global model is unchanged", server_round)
        evaluations = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        if evaluations:
            strategy.aggregate_evaluate(
                server_round, grid.send_and_receive(evaluations, timeout=policy.round_timeout))
        evaluate_fn(server_round, arrays)
        after_round(server_round, arrays)
        return_freed_memory()
    return arrays


def train_once(strategy: Strategy, grid: Grid, arrays: ArrayRecord, server_round: int,
               policy: RoundPolicy) -> ArrayRecord | None:
    """One attempt at a round's training: the new global arrays, or None (too few replies).

    A strategy with ``train_round(server_round, arrays, grid, timeout)`` runs its own
    exchanges (split learning: two per round, hfedmoe.federation.split_strategy); any other
    gets Flower's one: ``configure_train``, the replies, ``aggregate_train``."""
    custom = getattr(strategy, "train_round", None)
    if custom is not None:
        return custom(server_round, arrays, grid, policy.round_timeout)
    replies = grid.send_and_receive(
        strategy.configure_train(server_round, arrays, ConfigRecord(), grid),
        timeout=policy.round_timeout)
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    # replies is a generator (ProgressGrid): aggregate_train folded each upload in as it
    # arrived and dropped it (streaming aggregation, docs/architecture.md)
    del replies
    return aggregated
