"""The Flower strategy: per-client plans out, sparse replies in, aggregation by the method.

Stock ``FedAvg`` sends one payload to everyone and rejects replies whose keys differ; both
are overridden here (``configure_train``/``aggregate_train``), the round loop is Flower's.
The algorithm itself lives in the method (``hfedmoe.strategies``); this class only moves
records and keeps the books.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hfedmoe.aggregation import ClientUpdate
from hfedmoe.config import RunConfig
from hfedmoe.federation import records
from hfedmoe.federation.rounds import RoundBook
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.strategies import Method

log = logging.getLogger(__name__)


class NodeSamplingTimeout(RuntimeError):
    """Fewer nodes than required connected before the sampling deadline."""


def sample_node_ids(grid: Grid, fraction: float, seed: int, server_round: int,
                    deadline_seconds: float, poll_seconds: float = 1.0) -> list[int]:
    """Sample ``ceil(fraction * N)`` of the expected nodes, deterministically per round.

    Waits until ``expected`` nodes are connected, but never past ``deadline_seconds``
    (Flower's own ``sample_nodes`` can wait forever).
    """
    deadline = time.monotonic() + deadline_seconds
    while True:
        node_ids = sorted(grid.get_node_ids())
        if node_ids or time.monotonic() >= deadline:
            break
        time.sleep(poll_seconds)
    if not node_ids:
        raise NodeSamplingTimeout(f"no node connected within {deadline_seconds:.0f} s")
    count = max(1, round(fraction * len(node_ids)))
    return sorted(random.Random(f"{seed}/{server_round}").sample(node_ids, count))


class PlannedStrategy(Strategy):
    def __init__(self, config: RunConfig, method: Method, geometry: MoEGeometry,
                 book: RoundBook, sampling_deadline_seconds: float = 120.0) -> None:
        self._config, self._method, self._geometry, self._book = config, method, geometry, book
        self._flat_config = config.to_flat()
        self._sampling_deadline = sampling_deadline_seconds
        self._global: ArrayRecord | None = None
        self._sent: dict[int, int] = {}  # node id -> bytes sent this round
        self.client_of: dict[int, int] = {}  # node id -> client (partition) id, from replies

    def summary(self) -> None:
        log.info("hfedmoe strategy: method=%s, %d MoE layers x %d experts (top-%d)",
                 self._method.name, self._geometry.num_layers, self._geometry.num_experts,
                 self._geometry.top_k)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        node_ids = sample_node_ids(grid, self._config.train.fraction_train, self._config.seed,
                                   server_round, self._sampling_deadline)
        self._book.round_started(server_round, len(node_ids))
        payload_bytes = records.record_bytes(arrays)
        self._sent = {node_id: payload_bytes for node_id in node_ids}
        return [Message(self.instruction_for(node_id, server_round, arrays), node_id,
                        MessageType.TRAIN, group_id=str(server_round))
                for node_id in node_ids]

    def instruction_for(self, node_id: int, server_round: int, arrays: ArrayRecord
                        ) -> RecordDict:
        """The train instruction of one node: the extension point for per-client plans (each
        node gets its own message; ``self.client_of`` maps nodes seen before to client ids)."""
        return records.train_instruction(server_round, self._flat_config, arrays)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[ClientUpdate] = []
        failures: list[dict] = []
        traffic: dict[int, tuple[int, int]] = {}  # client id -> (bytes up, bytes down)
        answered: set[int] = set()
        global_state = records.from_array_record(self._global)

        def failure(node_id: int, reason: str) -> dict:
            return {"client_id": self.client_of.get(node_id, -1), "node_id": node_id,
                    "reason": reason}

        for reply in replies:
            node_id = reply.metadata.src_node_id
            answered.add(node_id)
            if reply.has_error():
                reason = (reply.error.reason or "").splitlines()[:1]
                failures.append(failure(node_id, f"error {reply.error.code}: {''.join(reason)}"))
                continue
            try:
                update = records.parse_train_reply(
                    reply.content, (self._geometry.num_layers, self._geometry.num_experts))
                records.check_update(update.state, global_state)
            except (ValueError, KeyError, TypeError) as exc:
                failures.append(failure(node_id, f"rejected reply: {exc}"))
                continue
            self.client_of[node_id] = update.client_id
            traffic[update.client_id] = (
                records.record_bytes(reply.content.array_records[records.UPDATE]),
                self._sent.get(node_id, 0))
            updates.append(update)
        failures += [failure(n, "no reply before the round timeout")
                     for n in self._sent if n not in answered]
        new_state, diagnostics = self._method.aggregate(global_state, updates)
        self._book.train_finished(server_round, updates, failures, traffic,
                                  sum(self._sent.values()), diagnostics)
        metrics = MetricRecord({"num-replies": len(updates), "num-failures": len(failures)})
        return records.to_array_record(new_state), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is centralised on the held-out test split (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None
