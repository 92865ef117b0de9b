"""Flower's simulation engine, polling only the nodes that have a message waiting.

Flower's simulation runtime (``flwr.server.superlink.fleet.vce.vce_api``) moves instructions
from its in-memory LinkState to the Ray actors with one thread, ``add_messages_to_queue``,
that asks the state for one pending message of EVERY registered node, then sleeps 0.1 s.
Each such ask locks the state and checks every stored message (expiry, federation
membership). With N connected nodes and K sampled, that is N asks over about 2K messages ten
times a second, in the process that also runs the server, on the same cores as the actors.
Measured on the embedded model (K = 10, 2-core machine, docs/scaling.md): a round took 1.04x
the in-process runtime's at N = 10, 1.23x at N = 100 and 1.56x at N = 1,000: a node that is
not sampled was not free.

:func:`addressed_nodes_only` replaces that thread's function, for the duration of a
``run_simulation`` call, by :func:`add_addressed_messages_to_queue`: one pass over the stored
messages finds the nodes that have an undelivered one, and only those are asked, in
Flower's node order, with Flower's own ``get_message_ins(node_id, limit=1)`` (which marks
the message delivered and runs the same checks). The messages queued are the same; the
cost per tick follows the messages waiting, not N. Where Flower's engine or state differs
from the one this was written against (``flwr`` 1.41-1.42: the function's parameters, the
state's ``message_ins_store`` and ``lock``), Flower's own function is left in place.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from queue import Queue
from typing import Any, Iterator, Mapping

EXPECTED_PARAMETERS = ("state", "queue", "nodes_mapping", "f_stop")
POLL_SECONDS = 0.1  # Flower's interval


def waiting_nodes(state: Any) -> set[int] | None:
    """The destination node ids of ``state``'s undelivered instructions; None when the state
    does not expose its store (another LinkState implementation): then every node is asked."""
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    if not isinstance(store, Mapping) or lock is None:
        return None
    with lock:
        return {message.metadata.dst_node_id for message in store.values()
                if message.metadata.delivered_at == ""}


def add_addressed_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Mapping[int, Any],
                                    f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` (same parameters, same messages queued), asking only
    the nodes with a waiting instruction (module docstring)."""
    while not f_stop.is_set():
        waiting = waiting_nodes(state)
        for node_id in nodes_mapping.keys():
            if waiting is not None and node_id not in waiting:
                continue
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(POLL_SECONDS)


@contextmanager
def addressed_nodes_only() -> Iterator[bool]:
    """Inside the block, Flower's simulation engine polls only nodes with a waiting message;
    yields whether the replacement is in place (False: this Flower's engine is not the one it
    was written for, and is left alone). Flower's function is restored on exit."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None or tuple(inspect.signature(original).parameters) != EXPECTED_PARAMETERS:
        yield False
        return
    vce_api.add_messages_to_queue = add_addressed_messages_to_queue
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
