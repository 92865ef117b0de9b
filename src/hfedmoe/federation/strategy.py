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
from dataclasses import replace
from typing import Callable, Iterable, Mapping, Sequence

import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hfedmoe import validation
from hfedmoe.calibration import Calibration
from hfedmoe.aggregation import ClientUpdate
from hfedmoe.config import RunConfig
from hfedmoe.federation import records
from hfedmoe.federation.rounds import RoundBook
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.strategies import Method, begin_aggregation, server_guidance

log = logging.getLogger(__name__)


class NodeSamplingTimeout(RuntimeError):
    """Fewer nodes than required connected before the sampling deadline."""


def sample_node_ids(grid: Grid, fraction: float, seed: int, server_round: int,
                    deadline_seconds: float, expected: int = 1, minimum: int = 1,
                    poll_seconds: float = 1.0,
                    order: Callable[[list[int]], list[int]] = sorted) -> list[int]:
    """Sample ``round(fraction * N)`` of the N connected nodes, deterministically per round.

    Waits until ``expected`` nodes are connected, but never past ``deadline_seconds``
    (Flower's own ``sample_nodes`` can wait forever); then samples from those connected,
    and raises NodeSamplingTimeout if fewer than ``minimum`` are. The seeded sample picks
    positions in ``order(node_ids)`` (called only when fewer than all are sampled): ordered by
    client id (``PlannedStrategy.order_by_client``), the same clients are sampled in every run
    of a configuration, whatever ids the runtime gave its nodes.
    """
    deadline = time.monotonic() + deadline_seconds
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected or time.monotonic() >= deadline:
            break
        time.sleep(poll_seconds)
    if len(node_ids) < max(1, minimum):
        raise NodeSamplingTimeout(f"{len(node_ids)} node(s) connected within "
                                  f"{deadline_seconds:.0f} s, {max(1, minimum)} needed")
    count = sample_size(fraction, len(node_ids))
    if count >= len(node_ids):
        return node_ids
    return sorted(random.Random(f"{seed}/{server_round}").sample(order(node_ids), count))


def sample_size(fraction: float, num_nodes: int) -> int:
    """How many of ``num_nodes`` connected nodes a round samples (train.fraction-train)."""
    return max(1, round(fraction * num_nodes))


# Flower error codes of error replies -> the kind recorded in a round's failures
ERROR_KINDS = {2: "raised", 3: "message-unavailable", 5: "node-unavailable", 8: "crashed"}
# failure kinds after which a node is not asked to evaluate in the same round (it would only
# cost the evaluation its timeout); a node that raised or was rejected is still reachable
UNREACHABLE_KINDS = frozenset({"message-unavailable", "node-unavailable", "crashed", "timeout"})


class PlannedStrategy(Strategy):
    def __init__(self, config: RunConfig, method: Method, geometry: MoEGeometry,
                 book: RoundBook, client_sizes: Sequence[int] | None = None,
                 lineage: str = "", calibration: Calibration | None = None,
                 guidance: Mapping[str, torch.Tensor] | None = None) -> None:
        self._config, self._method, self._geometry, self._book = config, method, geometry, book
        self._calibration = calibration  # sent to clients: profiles -> budgets (measured)
        self._lineage = lineage  # sent to clients: their personal state on disk (resume)
        self._client_sizes = client_sizes  # training examples per client id (reply bound)
        self._flat_config = config.to_flat()
        self._global: ArrayRecord | None = None
        self._sent: dict[int, int] = {}  # node id -> bytes sent this round
        self._evaluate_sent = 0  # bytes of this round's evaluation instructions
        self._instructions: list[Message] = []  # this round's, message ids set by the grid
        self.client_of: dict[int, int] = {}  # node id -> client (partition) id, from replies
        self._asked: set[int] = set()  # nodes sent an identity query (once per run)
        self._sampled_once = False  # the first sampling waits for every node; later ones not
        self._unreachable: set[int] = set()  # nodes lost in this round's training
        # the method's extra tensors for the next round (GuidedMethod; a checkpoint keeps them)
        self.guidance: dict[str, torch.Tensor] = dict(guidance or {})

    def summary(self) -> None:
        log.info("hfedmoe strategy: method=%s, %d MoE layers x %d experts (top-%d)",
                 self._method.name, self._geometry.num_layers, self._geometry.num_experts,
                 self._geometry.top_k)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        node_ids = self.sample_round(grid, server_round)
        guidance = records.to_array_record(self.guidance) if self.guidance else None
        payload_bytes = records.record_bytes(arrays) + (
            records.record_bytes(guidance) if guidance else 0)
        self._sent = {node_id: payload_bytes for node_id in node_ids}
        self._instructions = [Message(self.instruction_for(node_id, server_round, arrays,
                                                           guidance),
                                      node_id, MessageType.TRAIN, group_id=str(server_round))
                              for node_id in node_ids]
        return self._instructions

    def sample_round(self, grid: Grid, server_round: int) -> list[int]:
        """The nodes this round trains (train.fraction-train, seeded over client ids), and
        the round's start in the book."""
        federation = self._config.federation
        # Round 1 waits (up to the deadline) for all data.num-clients nodes to connect; later
        # rounds sample at once from the nodes connected, so a dead node costs no wait.
        expected = federation.min_replies if self._sampled_once else self._config.data.num_clients
        node_ids = sample_node_ids(grid, self._config.train.fraction_train, self._config.seed,
                                   server_round, federation.sampling_deadline,
                                   expected=expected, minimum=federation.min_replies,
                                   order=lambda ids: self.order_by_client(grid, ids,
                                                                          server_round))
        self._sampled_once = True
        self._book.round_started(server_round, len(node_ids))
        return node_ids

    def order_by_client(self, grid: Grid, node_ids: Sequence[int], server_round: int
                        ) -> list[int]:
        """``node_ids`` ordered by the client (partition) id each node holds, nodes whose id
        stays unknown last (by node id). Nodes not heard from before are asked once per run
        (records.identity_query, MessageType.QUERY) and given up to the sampling deadline;
        one that does not answer, or answers with an id that is not a valid client id or that
        another node holds, stays unknown and is not asked again."""
        unknown = [n for n in node_ids if n not in self.client_of and n not in self._asked]
        if unknown:
            self._asked.update(unknown)
            self._identify(grid, unknown, server_round)
        known = sorted((self.client_of[n], n) for n in node_ids if n in self.client_of)
        return [n for _, n in known] + sorted(n for n in node_ids if n not in self.client_of)

    def _identify(self, grid: Grid, node_ids: Sequence[int], server_round: int) -> None:
        messages = [Message(records.identity_query(server_round), node_id, MessageType.QUERY,
                            group_id=str(server_round)) for node_id in node_ids]
        waiting = dict(zip(grid.push_messages(messages), node_ids))  # message id -> node
        deadline = time.monotonic() + self._config.federation.sampling_deadline
        while waiting and time.monotonic() < deadline:
            replies = list(grid.pull_messages(list(waiting)))
            for reply in replies:
                node_id = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node_id is None or reply.has_error():
                    continue
                try:
                    client_id = records.parse_identity_reply(reply.content)
                    if not 0 <= client_id < self._config.data.num_clients:
                        raise ValueError(f"client id {client_id} out of range")
                    validation.check_identity(node_id, client_id, self.client_of, set())
                except ValueError as exc:
                    log.warning("node %d: identity not taken: %s", node_id, exc)
                    continue
                self.client_of[node_id] = client_id
            if waiting and not replies:
                time.sleep(0.05)

    def instruction_for(self, node_id: int, server_round: int, arrays: ArrayRecord,
                        guidance: ArrayRecord | None = None) -> RecordDict:
        """The train instruction of one node: the extension point for per-client plans (each
        node gets its own message; ``self.client_of`` maps nodes seen before to client ids)."""
        return records.train_instruction(server_round, self._flat_config, arrays, self._lineage,
                                         self._calibration, guidance)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply as it arrives and fold it into the method's aggregation
        (streaming for a StreamingMethod: the upload is dropped once added, so the server
        holds the running sums and one reply, not every client's upload); ``updates`` keeps
        what the round record needs (usage, metrics), not the tensors."""
        updates: list[ClientUpdate] = []
        failures: list[dict] = []
        traffic: dict[int, tuple[int, int]] = {}  # client id -> (bytes up, bytes down)
        answered: set[int] = set()
        global_state = records.from_array_record(self._global)
        limits = validation.ReplyLimits.for_run(self._config, self._geometry, self._method,
                                                self._client_sizes)
        aggregation = begin_aggregation(self._method, global_state)

        def failure(node_id: int, reason: str, kind: str = "rejected") -> dict:
            return {"client_id": self.client_of.get(node_id, -1), "node_id": node_id,
                    "kind": kind, "reason": reason}

        # the node each reply answers: the SuperLink's own error replies (node unavailable,
        # message expired) come from node 1, not from the node that was asked
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id
                   for m in self._instructions if m.metadata.message_id}
        for reply in replies:
            node_id = sent_to.get(reply.metadata.reply_to_message_id,
                                  reply.metadata.src_node_id)
            answered.add(node_id)
            if reply.has_error():
                reason = (reply.error.reason or "").splitlines()[:1]
                failures.append(failure(node_id, f"error {reply.error.code}: {''.join(reason)}",
                                        ERROR_KINDS.get(int(reply.error.code), "error")))
                continue
            update = None
            try:
                update = records.parse_train_reply(
                    reply.content, (self._geometry.num_layers, self._geometry.num_experts))
                validation.check_reply(update, global_state, limits)
                validation.check_identity(node_id, update.client_id, self.client_of,
                                          {u.client_id for u in updates}, self._sent.keys())
                aggregation.add(update)  # all or nothing: a reply it refuses is not counted
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("round %d: rejected the reply of node %d: %s", server_round,
                            node_id, exc)
                rejected = failure(node_id, f"rejected reply: {exc}")
                if update is not None:
                    rejected["client_id"] = validation.blamed_client(
                        node_id, update.client_id, self.client_of, limits.num_clients)
                failures.append(rejected)
                continue
            self.client_of[node_id] = update.client_id
            traffic[update.client_id] = (
                records.record_bytes(reply.content.array_records[records.UPDATE]),
                self._sent.get(node_id, 0))
            updates.append(replace(update, state={}, metrics={
                **update.metrics, "uploaded-tensors": len(update.state)}))
            del update, reply  # the upload lives on only in the aggregation's sums
        failures += [failure(n, "no reply before the round timeout", "timeout")
                     for n in self._sent if n not in answered]
        self._unreachable = {f["node_id"] for f in failures if f["kind"] in UNREACHABLE_KINDS}
        enough = len(updates) >= self._config.federation.min_replies
        new_state, diagnostics = aggregation.finish() if enough else (None, {})
        if enough:
            self.guidance = server_guidance(self._method, updates)
        self._book.train_finished(server_round, updates, failures, traffic,
                                  sum(self._sent.values()), diagnostics, aggregated=enough)
        metrics = MetricRecord({"num-replies": len(updates), "num-failures": len(failures),
                                "aggregated": int(enough)})
        # None: too few valid replies; the round loop retries or skips (federation.on-too-few)
        return (records.to_array_record(new_state) if enough else None), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Personalised evaluation: connected nodes evaluate the new global model (with their
        personal state) on their own test split, in every ``train.evaluate-every``-th round
        and the last; ``train.fraction-evaluate`` of them, sampled per round (seeded, apart
        from training's sample); none when data.client-test-fraction = 0. A node lost in
        this round's training (UNREACHABLE_KINDS) is not asked: it would hold the round
        until the timeout. The global test split is evaluated centrally (evaluate_fn)."""
        train = self._config.train
        last = server_round == self._config.num_server_rounds
        if self._config.data.client_test_fraction <= 0 or not (
                last or server_round % train.evaluate_every == 0):
            return []
        reachable = sorted(set(grid.get_node_ids()) - self._unreachable)
        if not reachable:
            return []
        count = sample_size(train.fraction_evaluate, len(reachable))
        chosen = reachable if count >= len(reachable) else sorted(
            random.Random(f"{self._config.seed}/evaluate/{server_round}")
            .sample(self.order_by_client(grid, reachable, server_round), count))
        content = records.evaluate_instruction(server_round, self._flat_config, arrays,
                                               self._lineage)
        self._evaluate_sent = records.record_bytes(arrays) * len(chosen)
        return [Message(content, node_id, MessageType.EVALUATE, group_id=str(server_round))
                for node_id in chosen]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Per-client accuracies into the round record (RoundBook.clients_evaluated); a
        failed or malformed reply, or one whose client id is not its node's, is counted,
        never averaged."""
        results: list[records.ClientAccuracy] = []
        failures = 0
        for reply in replies:
            try:
                if reply.has_error():
                    raise ValueError(f"error {reply.error.code}")
                result = records.parse_evaluate_reply(reply.content)
                validation.check_identity(reply.metadata.src_node_id, result.client_id,
                                          self.client_of, {r.client_id for r in results})
            except (ValueError, KeyError, TypeError):
                failures += 1
                continue
            results.append(result)
        summary = self._book.clients_evaluated(server_round, results, failures,
                                               bytes_down=self._evaluate_sent)
        return MetricRecord({k.replace("_", "-"): v for k, v in summary.items()
                             if v is not None})
