"""Sampling is drawn over client ids, not node ids: a runtime that gives its nodes random ids
(Ray simulation, a SuperLink) samples the same clients as the in-process runtime (ids 1..N)."""

from __future__ import annotations

import random

import pytest
from flwr.app import ConfigRecord, Message
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from hfedmoe.config import parse_run_config
from hfedmoe.federation import records
from hfedmoe.federation.grids import InProcessGrid
from hfedmoe.federation.rounds import RoundBook
from hfedmoe.federation.strategy import PlannedStrategy
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.strategies import method_for

from test_validation import _Display, _Sink

NUM_CLIENTS = 20


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class RenamedGrid(InProcessGrid):
    """In-process nodes under other ids: ``node_ids[k]`` holds partition k."""

    def __init__(self, client_app: ClientApp, node_ids: list[int]) -> None:
        super().__init__(client_app, len(node_ids))
        self._contexts = {node_ids[k]: self._contexts[k + 1] for k in range(len(node_ids))}
        for node_id, context in self._contexts.items():
            context.node_id = node_id

    def partition(self, node_id: int) -> int:
        return int(self._contexts[node_id].node_config["partition-id"])


def _identity_app(answers: dict[int, int] | None = None) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context) -> Message:
        partition = int(context.node_config["partition-id"])
        return Message(records.identity_reply((answers or {}).get(partition, partition)),
                       reply_to=msg)

    return app


def _sampled_clients(node_ids: list[int], answers: dict[int, int] | None = None
                     ) -> list[tuple[list[int], list[int]]]:
    """Per round 1..3: (trained, evaluated) partitions with fraction 0.25 each."""
    config = parse_run_config({"data.num-clients": NUM_CLIENTS, "train.fraction-train": 0.25,
                               "train.fraction-evaluate": 0.25, "seed": 7,
                               "num-server-rounds": 3})
    strategy = PlannedStrategy(config, method_for(config), MoEGeometry(2, 4, 2),
                               RoundBook(_Sink(), _Display()))
    grid = RenamedGrid(_identity_app(answers), node_ids)
    arrays = records.to_array_record({})
    rounds = []
    for server_round in (1, 2, 3):
        trained = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        evaluated = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        rounds.append(tuple(sorted(grid.partition(m.metadata.dst_node_id) for m in messages)
                            for messages in (trained, evaluated)))
    return rounds


def test_random_node_ids_sample_the_clients_of_the_in_process_runtime():
    in_process = _sampled_clients(list(range(1, NUM_CLIENTS + 1)))
    assert all(len(trained) == len(evaluated) == 5 for trained, evaluated in in_process)
    assert len({tuple(t) for t, _ in in_process}) > 1  # rounds differ
    for seed in (1, 2):
        ids = random.Random(seed).sample(range(10**6, 10**12), NUM_CLIENTS)
        assert _sampled_clients(ids) == in_process


def test_a_node_whose_answer_is_not_a_valid_client_id_stays_unknown():
    bad = {3: NUM_CLIENTS + 5, 4: 9}  # out of range; the id of node 10's partition, taken
    rounds = _sampled_clients(list(range(1, NUM_CLIENTS + 1)), answers=bad)
    assert all(len(trained) == 5 for trained, _ in rounds)  # still sampled, ordered last
