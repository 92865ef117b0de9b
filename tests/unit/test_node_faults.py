"""Deployment faults seen by the glue: a SuperLink error reply names the node that was asked,
a pull blocked by a node killed mid-upload costs no healthy reply, and a SuperNode whose node
config splits the data differently from the run fails loudly."""

import time
from types import SimpleNamespace

import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from hfedmoe.config import parse_run_config
from hfedmoe.federation import records
from hfedmoe.federation.client_app import make_client_app, node_partition
from hfedmoe.federation.grids import InProcessGrid, ProgressGrid

from test_validation import _content, _failures, _global_state, _strategy


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _push_round(strategy, server_round, global_state, grid):
    """configure_train, then push (the grid sets each instruction's message id)."""
    sent = list(strategy.configure_train(server_round, records.to_array_record(global_state),
                                         None, grid))
    grid.push_messages(sent)
    return {m.metadata.dst_node_id: m for m in sent}


def test_a_superlink_error_reply_is_recorded_once_under_the_node_that_was_asked():
    """Flower's SuperLink answers for a node that stopped heartbeating with an error reply
    whose source is the SuperLink (node id 1), not the dead node."""
    global_state = _global_state()
    strategy, _, book, sink = _strategy(3)
    grid = InProcessGrid(client_app=None, num_nodes=3)  # nodes 1..3; node 1 is honest
    sent = _push_round(strategy, 1, global_state, grid)
    strategy.aggregate_train(1, [Message(_content(n - 1, global_state), reply_to=sent[n])
                                 for n in (1, 2, 3)])
    _failures(book, sink, 1)
    sent = _push_round(strategy, 2, global_state, grid)
    unavailable = create_message_error_unavailable_res_message(sent[3].metadata, "node_unavail")
    assert unavailable.metadata.src_node_id == 1  # what Flower does
    _, metrics = strategy.aggregate_train(2, [
        Message(_content(0, global_state), reply_to=sent[1]),
        Message(_content(1, global_state), reply_to=sent[2]), unavailable])
    failures = _failures(book, sink, 2)
    assert [(f["node_id"], f["client_id"], f["kind"]) for f in failures] == \
        [(3, 2, "node-unavailable")]
    assert [c["client_id"] for c in sink.rounds[-1]["clients"]] == [0, 1]
    assert metrics["aggregated"] == 1
    # the lost node is not asked to evaluate this round (it would hold the round until the
    # timeout); the next round's training asks it again
    arrays = records.to_array_record(global_state)
    evaluations = strategy.configure_evaluate(2, arrays, None, grid)
    assert sorted(m.metadata.dst_node_id for m in evaluations) == [1, 2]
    assert sorted(_push_round(strategy, 3, global_state, grid)) == [1, 2, 3]


def _context(node_config):
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_node_partition_must_come_from_the_runs_partitioning():
    config = parse_run_config({"data.num-clients": 2})
    assert node_partition(_context({"partition-id": 1, "num-partitions": 2}), config) == 1
    assert node_partition(_context({"partition-id": 1}), config) == 1  # not given: trusted
    with pytest.raises(ValueError, match=r"num-partitions=3 .* data.num-clients=2"):
        node_partition(_context({"partition-id": 1, "num-partitions": 3}), config)


def test_a_misconfigured_supernode_fails_its_round_loudly():
    config = parse_run_config({"data.num-clients": 2})
    grid = InProcessGrid(make_client_app(), 1, node_configs=[{"num-partitions": 3}])
    content = records.train_instruction(1, config.to_flat(), ArrayRecord())
    [reply] = grid.send_and_receive([Message(content, 1, MessageType.TRAIN, group_id="1")])
    assert reply.has_error() and reply.error.code == 2  # ClientApp raised
    first_line = reply.error.reason.splitlines()[0]
    assert first_line == ("ValueError: node config num-partitions=3 differs from the run's "
                          "data.num-clients=2")


class _BlockingGrid:
    """Replies a, b, c are due; c's sender died mid-upload, so the pull that meets it blocks
    past the round deadline (Flower: until the object-push session expires), while a and b
    complete. Pull 1: nothing ready; pull 2: blocks, returns c's error; pull 3: a and b."""

    def __init__(self, block_seconds):
        self.block_seconds, self.pulls = block_seconds, 0

    def push_messages(self, messages):
        return ["a", "b", "c"]

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls == 2:
            time.sleep(self.block_seconds)
            return [_reply("c")]
        return [_reply(i) for i in ("a", "b") if i in message_ids] if self.pulls > 2 else []


def _reply(message_id):
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))


def test_a_pull_blocked_past_the_deadline_does_not_cost_the_replies_completed_meanwhile():
    inner, seen = _BlockingGrid(block_seconds=1.0), []
    grid = ProgressGrid(inner, seen.append, poll_seconds=0.05)
    began = time.monotonic()
    replies = grid.send_and_receive([], timeout=0.5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert len(seen) == 3 and inner.pulls == 3  # one pull after the deadline, no more
    assert time.monotonic() - began < 2.0


def test_the_progress_grid_pushes_before_its_replies_are_read():
    """send_and_receive yields replies lazily (streaming aggregation) but pushes at once: the
    strategy maps a SuperLink error reply (sent from node 1) to the node asked through the
    instructions' message ids, which exist only once they are pushed. (A lazy push made a
    killed SuperNode count as 'node 1 unavailable' plus a timeout.)"""
    grid = ProgressGrid(InProcessGrid(make_client_app(), 2), lambda reply: None)
    messages = [Message(RecordDict(), node, MessageType.TRAIN, group_id="1") for node in (1, 2)]
    replies = grid.send_and_receive(messages, timeout=30)
    assert all(m.metadata.message_id for m in messages)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        m.metadata.message_id for m in messages)
