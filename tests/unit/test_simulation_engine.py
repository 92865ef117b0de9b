"""Flower's simulation engine asks only nodes with a waiting message
(hfedmoe.federation.simulation_engine): the same messages reach the queue as with Flower's
own polling thread, with asks that follow the waiting messages, not the registered nodes."""

from __future__ import annotations

import threading
import time
from queue import Queue
from types import SimpleNamespace

from flwr.server.superlink.fleet.vce import vce_api

from hfedmoe.federation.simulation_engine import (
    add_addressed_messages_to_queue,
    addressed_nodes_only,
)


class FakeLinkState:
    """The part of Flower's InMemoryLinkState the polling thread uses: a store of
    instructions, its lock, and ``get_message_ins`` (one undelivered message of a node, in
    store order, marked delivered), counting the asks."""

    def __init__(self, destinations: list[int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            f"m{i}": SimpleNamespace(name=f"m{i}", metadata=SimpleNamespace(
                dst_node_id=node, delivered_at="")) for i, node in enumerate(destinations)}
        self.asks: list[int] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list:
        with self.lock:
            self.asks.append(node_id)
            found = [m for m in self.message_ins_store.values()
                     if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""]
            found = found[:limit] if limit else found
            for message in found:
                message.metadata.delivered_at = "now"
            return found


def drain(poll, state: FakeLinkState, nodes: dict[int, int], expected: int) -> list[str]:
    """Run ``poll`` in a thread until ``expected`` messages are queued; their names in order."""
    queue, stop = Queue(), threading.Event()
    thread = threading.Thread(target=poll, args=(state, queue, nodes, stop))
    thread.start()
    deadline = time.monotonic() + 30
    while queue.qsize() < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join()
    return [queue.get().name for _ in range(queue.qsize())]


def test_the_same_messages_are_queued_with_asks_only_for_waiting_nodes():
    nodes = {node_id: partition for partition, node_id in enumerate(range(100, 1100))}  # 1,000
    destinations = [105, 333, 105, 999, 1099, 333]  # six instructions to four nodes
    flower, ours = FakeLinkState(destinations), FakeLinkState(destinations)
    flower_queued = drain(vce_api.add_messages_to_queue, flower, nodes, len(destinations))
    our_queued = drain(add_addressed_messages_to_queue, ours, nodes, len(destinations))
    assert sorted(our_queued) == sorted(flower_queued) == [f"m{i}" for i in range(6)]
    assert our_queued == flower_queued  # Flower's node order, one message per node per tick
    assert len(flower.asks) >= len(nodes)  # Flower asks every registered node every tick
    assert set(ours.asks) == set(destinations)  # we ask the four that have a message
    assert all(ours.asks.count(n) == destinations.count(n) for n in set(destinations))


def test_a_state_without_a_visible_store_is_polled_node_by_node():
    class OpaqueState:  # another LinkState implementation: no message_ins_store to read
        def __init__(self) -> None:
            self.asks: list[int] = []

        def get_message_ins(self, node_id: int, limit: int | None) -> list:
            self.asks.append(node_id)
            return [SimpleNamespace(name="m")] if node_id == 8 and self.asks.count(8) == 1 else []

    state = OpaqueState()
    assert drain(add_addressed_messages_to_queue, state, {7: 0, 8: 1, 9: 2}, 1) == ["m"]
    assert {7, 8, 9} <= set(state.asks)


def test_the_replacement_holds_inside_the_block_only():
    original = vce_api.add_messages_to_queue
    with addressed_nodes_only() as replaced:
        assert replaced is True
        assert vce_api.add_messages_to_queue is add_addressed_messages_to_queue
    assert vce_api.add_messages_to_queue is original


def test_only_flowers_run_simulation_deprecation_is_dropped(caplog):
    """The Ray runtime calls Flower's run_simulation on purpose; the warning Flower logs on
    every call is dropped, every other Flower warning passes, and nothing is dropped after."""
    import inspect
    import logging

    from flwr.common.logger import log, warn_deprecated_feature
    from flwr.simulation import run_simulation

    from hfedmoe.runner import run_simulation_deprecation_quiet

    # the text the filter keys on is the one Flower's run_simulation logs
    source = " ".join(inspect.getsource(run_simulation).split())
    assert "warn_deprecated_feature( \"The `run_simulation` function is deprecated" in source
    text = "The `run_simulation` function is deprecated and will be removed"
    with caplog.at_level(logging.INFO, logger="flwr"):
        with run_simulation_deprecation_quiet():
            warn_deprecated_feature(text)
            log(logging.WARNING, "a node was lost")
        warn_deprecated_feature(text)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("`run_simulation` function is deprecated" in m for m in messages) == 1
    assert "a node was lost" in messages
