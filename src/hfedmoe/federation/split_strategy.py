"""The Flower glue of split learning (ho-sfl, sfl, zo-sfl): a round of one or two exchanges.

:class:`SplitStrategy` gives the generic round loop (``federation.loop``) a ``train_round``
that replaces Flower's single train exchange:

1. the sampled nodes get theta_c (``phase = forward``; zo-sfl: ``perturbed`` with the round's
   direction seeds) and answer with their cut-layer activations, mask and labels;
2. the server computes each client's loss and lambda, steps the server part
   (hfedmoe.strategies.ho_sfl.SplitServer);
3. (ho-sfl, sfl) the nodes that answered get their lambda (``zo`` with the seeds, or
   ``gradient``) and answer with P scalars or theta_c's gradient; a node that fails here is
   left out of the client part's update;
4. the client part steps; the new global arrays go back to the loop.

Bytes are counted per message and per direction; the round record gets
``bytes_up_activations`` (step 1) and ``bytes_up_updates`` (step 3). The algorithm is in
``hfedmoe.strategies.ho_sfl``; this module only moves records and keeps the books.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from flwr.app import ArrayRecord, Message, MessageType
from flwr.serverapp import Grid

from hfedmoe import validation
from hfedmoe.aggregation import ClientUpdate
from hfedmoe.federation import records
from hfedmoe.federation.strategy import ERROR_KINDS, PlannedStrategy, UNREACHABLE_KINDS
from hfedmoe.model.state import expert_of, read_state, write_state
from hfedmoe.split import direction_seeds
from hfedmoe.strategies.ho_sfl import SplitServer

log = logging.getLogger(__name__)


class SplitStrategy(PlannedStrategy):
    """A :class:`PlannedStrategy` whose training round is :meth:`train_round`
    (``method`` here is only for the round book's name; the algorithm is ``server``)."""

    def __init__(self, *args, server: SplitServer,
                 params: Mapping[str, torch.nn.Parameter], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._server, self._params = server, params
        self._split_method = server.method

    def train_round(self, server_round: int, arrays: ArrayRecord, grid: Grid,
                    timeout: float) -> ArrayRecord | None:
        """One split-learning round (module docstring); None when fewer than
        ``federation.min-replies`` first replies were valid (nothing changed)."""
        self._global = arrays
        write_state(self._params, records.from_array_record(arrays))
        split, method = self._server.split, self._split_method
        node_ids = self.sample_round(grid, server_round)
        seeds = (direction_seeds(self._config.seed, server_round, method.directions)
                 if method.uses_directions else [])
        client_part = records.to_array_record(read_state(self._params, split.sent_keys))
        first = method.phases[0]
        content = records.split_instruction(server_round, self._flat_config, first,
                                            client_part, seeds=seeds)
        self._sent = {n: records.record_bytes(client_part) for n in node_ids}
        failures: list[dict] = []
        self._server.begin_round()
        accepted: dict[int, tuple[records.SplitReply, float, torch.Tensor]] = {}
        scalars: dict[int, list[float]] = {}
        for node_id, reply in self._exchange(grid, node_ids, server_round, content, timeout,
                                             first, failures):  # in client-id order
            try:
                validation.check_identity(node_id, reply.client_id, self.client_of,
                                          {r.client_id for r, _, _ in accepted.values()},
                                          self._sent.keys())
                loss, lam, values = self._server.add_client(
                    reply.z, reply.attention_mask, reply.labels, reply.perturbed)
            except ValueError as exc:
                failures.append(self._failure(node_id, f"rejected reply: {exc}"))
                continue
            self.client_of[node_id] = reply.client_id
            accepted[node_id] = (reply, loss, lam)
            self._book.client_finished(server_round, reply.client_id, {
                "num-examples": reply.num_examples, "train-loss": loss,
                "mean-step-seconds": reply.metrics.get("mean-step-seconds")})
            if values:
                scalars[node_id] = values
        enough = len(accepted) >= self._config.federation.min_replies
        if not enough:
            self._server.begin_round()  # the partial gradients are dropped
            self._finish(server_round, accepted, {}, failures, aggregated=False)
            return None
        self._server.step_server_part()
        updates_up: dict[int, int] = {}
        second_metrics: dict[int, Mapping[str, float]] = {}  # the second replies' metrics
        active: dict[int, torch.Tensor] = {}  # ho-sfl.active-experts: what each perturbed
        gradients: list[Mapping[str, torch.Tensor]] = []
        if len(method.phases) > 1:
            second = method.phases[1]
            theta = read_state(self._params, split.client_keys)  # gradients' reference shapes
            messages = {}
            for node_id, (_, _, lam) in accepted.items():
                messages[node_id] = records.split_instruction(
                    server_round, self._flat_config, second, cut_gradient=lam, seeds=seeds)
                self._sent[node_id] += records.record_bytes(
                    messages[node_id].array_records[records.CUT_GRADIENT])
            for node_id, reply in self._exchange(grid, list(messages), server_round, messages,
                                                 timeout, second, failures):
                if reply.client_id != accepted[node_id][0].client_id:
                    failures.append(self._failure(node_id, "second reply from another client"))
                    continue
                updates_up[node_id] = reply.bytes_up
                second_metrics[node_id] = reply.metrics
                if second == "zo":
                    if method.active_experts and reply.active is None:
                        failures.append(self._failure(node_id, "zo: no 'active' experts"))
                        del updates_up[node_id]
                        continue
                    scalars[node_id] = list(reply.scalars)
                    if reply.active is not None:
                        active[node_id] = reply.active
                else:
                    try:
                        validation.check_tensors(reply.gradient, theta)
                    except ValueError as exc:
                        failures.append(self._failure(node_id, f"rejected gradient: {exc}"))
                        del updates_up[node_id]
                        continue
                    gradients.append(reply.gradient)
        order = sorted(scalars, key=lambda n: accepted[n][0].client_id)  # as the replies
        self._server.step_client_part(seeds, [scalars[n] for n in order], gradients,
                                      [active[n] for n in order] if active else ())
        self._finish(server_round, accepted, updates_up, failures, aggregated=True,
                     completed=set(scalars) | set(updates_up), active=active,
                     second_metrics=second_metrics)
        return records.to_array_record(read_state(self._params))

    def _exchange(self, grid: Grid, node_ids, server_round: int, content, timeout: float,
                  phase: str, failures: list[dict]):
        """Send ``content`` (one RecordDict for all, or node id -> RecordDict) to
        ``node_ids``; return (node id, parsed reply) for each valid reply, in the order of
        the client ids they name (node ids are drawn anew by every run, and the server sums
        the clients' gradients and scalars in this order: a run is then bit-reproducible);
        errors, malformed replies and timeouts go to ``failures``."""
        messages = [Message(content[n] if isinstance(content, dict) else content, n,
                            MessageType.TRAIN, group_id=str(server_round)) for n in node_ids]
        replies = grid.send_and_receive(messages, timeout=timeout)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
                   if m.metadata.message_id}
        answered, parsed_replies = set(), []
        for reply in replies:
            node_id = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node_id)
            if reply.has_error():
                reason = (reply.error.reason or "").splitlines()[:1]
                failures.append(self._failure(
                    node_id, f"{phase}: error {reply.error.code}: {''.join(reason)}",
                    ERROR_KINDS.get(int(reply.error.code), "error")))
                continue
            try:
                parsed = records.parse_split_reply(
                    reply.content, phase, self._server.split.hidden_size,
                    self._config.model.max_length, self._split_method.directions,
                    (self._geometry.num_layers, self._geometry.num_experts))
            except (ValueError, KeyError, TypeError) as exc:
                failures.append(self._failure(node_id, f"{phase}: rejected reply: {exc}"))
                continue
            parsed_replies.append((node_id, parsed))
        failures += [self._failure(n, f"{phase}: no reply before the round timeout", "timeout")
                     for n in node_ids if n not in answered]
        self._unreachable |= {f["node_id"] for f in failures if f["kind"] in UNREACHABLE_KINDS}
        return sorted(parsed_replies, key=lambda item: (item[1].client_id, item[0]))

    def _failure(self, node_id: int, reason: str, kind: str = "rejected") -> dict:
        return {"client_id": self.client_of.get(node_id, -1), "node_id": node_id,
                "kind": kind, "reason": reason}

    def _finish(self, server_round: int, accepted, updates_up: Mapping[int, int],
                failures: list[dict], aggregated: bool, completed: set[int] = frozenset(),
                active: Mapping[int, torch.Tensor] | None = None,
                second_metrics: Mapping[int, Mapping[str, float]] | None = None) -> None:
        geometry, split = self._geometry, self._server.split
        trained = torch.zeros(geometry.num_layers, geometry.num_experts, dtype=torch.bool)
        for key in split.client_keys:
            if (expert := expert_of(key)) is not None:
                trained[expert] = True
        updates, traffic = [], {}
        activations_up = 0
        for node_id, (reply, loss, _) in accepted.items():
            moved = (active or {}).get(node_id, trained)  # the client-part experts it moved
            later = (second_metrics or {}).get(node_id, {})
            peak = max(reply.metrics.get("peak-memory-bytes", 0),
                       later.get("peak-memory-bytes", 0))  # the larger of its two exchanges
            seconds = reply.metrics.get("mean-step-seconds", 0.0) + later.get(
                "mean-step-seconds", 0.0)  # its compute in the round
            activations_up += reply.bytes_up
            up = reply.bytes_up + updates_up.get(node_id, 0)
            traffic[reply.client_id] = (up, self._sent.get(node_id, 0))
            updates.append(ClientUpdate(
                reply.client_id, reply.num_examples, {},
                torch.zeros(geometry.num_layers, geometry.num_experts),
                {"train-loss": loss, "budget-experts": int(trained.sum()),
                 "max-active-experts-per-batch": int(moved.sum()),
                 "peak-memory-bytes": peak,
                 "peak-memory-estimate-bytes": 0,
                 "mean-step-seconds": seconds,
                 "local-steps": 1,  # its batch trained the server part
                 **{k: reply.metrics[k] for k in records.OPTIONAL_REPLY_METRIC_KEYS
                    if k in reply.metrics}},
                trained=moved))
        # completed: the client also took part in the client part's update (zo-sfl: always)
        single = len(self._split_method.phases) == 1
        self._book.train_finished(
            server_round, updates, failures, traffic, sum(self._sent.values()),
            {"bytes_up_activations": activations_up,
             "bytes_up_updates": sum(updates_up.values()),
             "clients": {reply.client_id: {"completed": single or node_id in completed}
                         for node_id, (reply, _, _) in accepted.items()}},
            aggregated=aggregated)
