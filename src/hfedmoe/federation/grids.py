"""Grids: an in-process runtime for fast tests, and a progress-reporting wrapper for any grid.

``InProcessGrid`` runs the real ClientApp object in this process: the ServerApp, strategy,
messages and ClientApp are exactly those of the Ray and deployment runtimes; only transport
and scheduling are replaced (clients run one after another, in the caller's thread).
"""

from __future__ import annotations

import time
import traceback
import uuid
from typing import Callable, Iterable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0


def _set_message_id(message: Message) -> str:
    message_id = str(uuid.uuid4())
    message.metadata.__dict__["_message_id"] = message_id
    return message_id


class InProcessGrid(Grid):
    """Nodes 1..N hold partitions 0..N-1; each pull runs one pending ClientApp call."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1,
                 node_configs: list[dict] | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 1
        self._run = Run.create_empty(run_id)
        self._client_app = client_app
        configs = node_configs or [{} for _ in range(num_nodes)]
        self._contexts = {
            node + 1: Context(
                run_id=run_id, node_id=node + 1,
                node_config={"partition-id": node, "num-partitions": num_nodes, **configs[node]},
                state=RecordDict(), run_config={},
            )
            for node in range(num_nodes)
        }
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = _set_message_id(message)
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        for message_id in message_ids:
            if message_id in self._pending:
                return [self._execute(self._pending.pop(message_id))]
        return []

    def _execute(self, message: Message) -> Message:
        context = self._contexts[message.metadata.dst_node_id]
        try:
            reply = self._client_app(message, context)
        except Exception as exc:  # a failing client must not stop the run
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                            reply_to=message)
        _set_message_id(reply)
        return reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        return [reply for message_id in ids for reply in self.pull_messages([message_id])]


class ProgressGrid(Grid):
    """Delegates to ``inner`` and reports every reply as it arrives (for a live display).

    ``send_and_receive`` stops pulling at ``timeout``; the caller counts the sampled nodes
    without a reply as timed out. A reply returned by a pull that began before the deadline
    is kept even if the pull itself returned late: with a SuperLink, a node killed mid-upload
    can block a pull for minutes (docs/reliability.md), and the healthy replies it then
    returns are complete; so are those that completed while it blocked, which one more pull
    collects. In-process, clients run inside the pull, one after another, so
    nothing can preempt a slow client there; use the Ray runtime to test timeouts.
    """

    def __init__(self, inner: Grid, on_reply: Callable[[Message], None],
                 poll_seconds: float = 0.2) -> None:
        self._inner, self._on_reply, self._poll_seconds = inner, on_reply, poll_seconds

    def set_run(self, run: Run) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        return self._inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterator[Message]:
        """Push ``messages`` now (they get their message ids, which the caller maps replies
        back with), then return an iterator that yields each reply as it is pulled. The
        caller may drop a reply before the next one arrives, so a server that aggregates as
        it goes holds one upload at a time."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._replies(pending, deadline)

    def _replies(self, pending: set[str], deadline: float | None) -> Iterator[Message]:
        """The replies to the ``pending`` message ids, as they arrive, until ``deadline``."""
        while pending and (deadline is None or time.monotonic() < deadline):
            arrived = 0
            for reply in self._collect(pending):
                arrived += 1
                yield reply
            if pending and deadline is not None and time.monotonic() >= deadline:
                # the pull outlasted the deadline (blocked by a node killed mid-upload): the
                # replies that completed meanwhile are ready; one more pull keeps them
                yield from self._collect(pending)
                break
            if pending and not arrived:
                time.sleep(self._poll_seconds)

    def _collect(self, pending: set[str]) -> Iterator[Message]:
        """Pull the ``pending`` replies that are ready and yield them one by one (each is
        dropped from the pulled batch before it is yielded: none is held here afterwards)."""
        ready = list(self.pull_messages(list(pending)))
        ready.reverse()
        while ready:
            reply = ready.pop()
            pending.discard(reply.metadata.reply_to_message_id)
            self._on_reply(reply)
            yield reply
