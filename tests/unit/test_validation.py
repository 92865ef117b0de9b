"""Reply validation: every kind of bad reply is rejected with its reason, and the round's
aggregate equals - exactly - the aggregate of the good replies alone (issue #5, part 3).

The round runs through the real PlannedStrategy.aggregate_train on real Flower messages; the
expected aggregate is computed independently by the method on the good updates only.
"""

import gc
import math
import weakref

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity

from hfedmoe import validation
from hfedmoe.config import ALIGNING_METHODS, METHODS, SPLIT_METHODS, parse_run_config
from hfedmoe.federation import records
from hfedmoe.federation.grids import InProcessGrid
from hfedmoe.federation.rounds import RoundBook
from hfedmoe.federation.strategy import PlannedStrategy
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.strategies import method_for
from hfedmoe.training import LocalTrainingResult

GEOMETRY = MoEGeometry(num_layers=2, num_experts=4, top_k=2)
SIZE = 100  # training examples of every client, as the server computes them
MAX_NORM = 50.0


def _global_state():
    g = torch.Generator().manual_seed(0)
    state = {f"expert.{l}.{e}.w": torch.randn(3, generator=g) for l in range(2) for e in range(4)}
    state.update({f"router.{l}.weight": torch.randn(4, 3, generator=g) for l in range(2)})
    state["shared.head"] = torch.randn(2, 3, generator=g)
    return state


def _honest(client_id, global_state, budget=4, steps=5):
    """An honest reply: trains 3 experts, uploads them, its routers and the head."""
    g = torch.Generator().manual_seed(100 + client_id)
    trained = torch.zeros(2, 4, dtype=torch.bool)
    for flat in torch.randperm(8, generator=g)[:3]:
        trained[int(flat) // 4, int(flat) % 4] = True
    usage = torch.softmax(torch.randn(2, 4, generator=g), dim=1)  # rows sum to 1
    upload = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in global_state.items()
              if not k.startswith("expert.") or bool(trained[int(k.split(".")[1]),
                                                             int(k.split(".")[2])])}
    result = LocalTrainingResult(
        num_examples=10 + 20 * client_id % 90, train_loss=1.0, trained_experts=trained,
        usage=usage, importance=torch.rand(2, 4, generator=g), max_active_experts_per_batch=3,
        peak_memory_bytes=1000, mean_step_seconds=0.1, local_steps=steps)
    return upload, result


def _content(client_id, global_state):
    upload, result = _honest(client_id, global_state)
    return records.train_reply(client_id, 4, upload, result)


def _set_metric(key, value):
    def mutate(content):
        content.metric_records[records.METRICS][key] = value
    return mutate


def _set_routing(key, index, value):
    def mutate(content):
        values = list(content.metric_records[records.ROUTING][key])
        values[index] = value
        content.metric_records[records.ROUTING][key] = values
    return mutate


def _set_tensor(key, make):
    def mutate(content):
        state = records.from_array_record(content.array_records[records.UPDATE])
        state[key] = make(state.get(key))
        content.array_records[records.UPDATE] = ArrayRecord(  # dtypes as they are
            {k: Array(v.numpy()) for k, v in state.items()})
    return mutate


def _drop_importance(content):
    del content.metric_records[records.ROUTING]["importance"]


def _drop_metric(key):
    def mutate(content):
        del content.metric_records[records.METRICS][key]
    return mutate


def _untrained_expert(content):
    """Upload a changed expert whose trained flag is 0 (an unplanned expert)."""
    trained = list(content.metric_records[records.ROUTING]["trained"])
    flat = trained.index(0)
    key = f"expert.{flat // 4}.{flat % 4}.w"
    state = records.from_array_record(content.array_records[records.UPDATE])
    state[key] = _global_state()[key] + 1.0
    content.array_records[records.UPDATE] = records.to_array_record(state)


def _over_trained(content):
    """4 trained experts in 1 local step with a budget of 3: more than the budget allows."""
    _set_metric("local-steps", 1)(content)
    _set_metric("budget-experts", 3)(content)
    trained = list(content.metric_records[records.ROUTING]["trained"])
    flat = trained.index(0)
    trained[flat] = 1
    content.metric_records[records.ROUTING]["trained"] = trained


BAD = {  # kind of bad reply -> (mutation of an honest reply, fragment of the reason)
    "unknown-tensor": (_set_tensor("expert.9.9.w", lambda _: torch.zeros(3)), "unknown tensor"),
    "wrong-shape": (_set_tensor("shared.head", lambda t: torch.zeros(3, 2)), "shape"),
    "wrong-dtype": (_set_tensor("shared.head", lambda t: t.double()), "dtype"),
    "nan-tensor": (_set_tensor("shared.head", lambda t: t * float("nan")), "non-finite"),
    "inf-tensor": (_set_tensor("router.0.weight", lambda t: t / 0.0), "non-finite"),
    "absurd-norm": (_set_tensor("shared.head", lambda t: t + 100.0), "update norm"),
    "missing-field": (_drop_metric("num-examples"), "lack num-examples"),
    "nan-examples": (_set_metric("num-examples", float("nan")), "num-examples"),
    "inf-examples": (_set_metric("num-examples", float("inf")), "num-examples"),
    "huge-examples": (_set_metric("num-examples", 10**9), "exceeds client"),
    "zero-examples": (_set_metric("num-examples", 0), "num-examples = 0"),
    "negative-examples": (_set_metric("num-examples", -5), "negative"),
    "fractional-examples": (_set_metric("num-examples", 7.5), "not an integer"),
    "client-id-out-of-range": (_set_metric("client-id", 999), "outside"),
    "nan-usage": (_set_routing("usage", 0, float("nan")), "usage"),
    "usage-above-one": (_set_routing("usage", 0, 1.5), "usage"),
    "usage-row-sum": (_set_routing("usage", 0, 0.0), "rows sum"),
    "nan-importance": (_set_routing("importance", 3, float("nan")), "importance"),
    "missing-importance": (_drop_importance, "lacks the round-mean importance"),
    "importance-above-one": (_set_routing("importance", 3, 7.0), "importance"),
    "trained-not-binary": (_set_routing("trained", 0, 2), "trained"),
    "unplanned-expert": (_untrained_expert, "unplanned"),
    "max-active-over-budget": (_set_metric("budget-experts", 2), "exceeds budget-experts"),
    "trained-over-budget": (_over_trained, "exceed budget-experts"),
    "budget-below-top-k": (_set_metric("budget-experts", 1), "budget-experts = 1"),
    "too-many-steps": (_set_metric("local-steps", 50), "local-steps = 50"),
    "nan-loss": (_set_metric("train-loss", float("nan")), "train-loss"),
}
NUM_GOOD = 3


class _Sink:
    def __init__(self):
        self.rounds = []

    def record_round(self, record):
        self.rounds.append(record)


class _Display:
    def round_started(self, server_round, num_sampled=None):
        pass

    def round_finished(self, record):
        pass


def _strategy(num_nodes, **overrides):
    config = parse_run_config({"method": "hfedmoe", "data.num-clients": num_nodes,
                               "train.local-steps": 5,
                               "federation.max-update-norm": MAX_NORM, **overrides})
    sink = _Sink()
    book = RoundBook(sink, _Display())
    strategy = PlannedStrategy(config, method_for(config), GEOMETRY, book,
                               client_sizes=[SIZE] * num_nodes)
    return strategy, config, book, sink


def _failures(book, sink, server_round):
    book.evaluated(server_round, 0.0, 0.0)  # completes the round record
    return sink.rounds[-1]["failures"]


def _round(strategy, server_round, contents_by_node, global_state):
    """Send the round out (real sampling of nodes 1..N), then aggregate the given replies."""
    grid = InProcessGrid(client_app=None, num_nodes=len(contents_by_node))
    arrays = records.to_array_record(global_state)
    instructions = {m.metadata.dst_node_id: m
                    for m in strategy.configure_train(server_round, arrays, ConfigRecord(), grid)}
    replies = [Message(content, reply_to=instructions[node])
               for node, content in contents_by_node.items()]
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    return records.from_array_record(new_arrays), metrics


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _bad_contents(global_state):
    """One bad reply of each kind, client ids NUM_GOOD.. (distinct nodes)."""
    contents = {}
    for index, (kind, (mutate, _)) in enumerate(BAD.items()):
        content = _content(NUM_GOOD + index, global_state)
        mutate(content)
        contents[kind] = content
    return contents


def test_every_bad_reply_is_rejected_and_the_aggregate_equals_the_good_ones(caplog):
    global_state = _global_state()
    bad = _bad_contents(global_state)
    good = [_content(c, global_state) for c in range(NUM_GOOD)]
    # interleave: good replies first and last, bad ones between
    ordered = [good[0], *list(bad.values())[:10], good[1], *list(bad.values())[10:], good[2]]
    strategy, config, book, sink = _strategy(len(ordered))
    new_state, metrics = _round(strategy, 1, {n + 1: c for n, c in enumerate(ordered)},
                                global_state)

    expected, _ = method_for(config).aggregate(
        global_state, [records.parse_train_reply(c, (2, 4)) for c in good])  # independent
    assert set(new_state) == set(expected)
    for key in expected:
        assert torch.equal(new_state[key], expected[key]), key
    assert metrics["num-replies"] == NUM_GOOD and metrics["num-failures"] == len(BAD)
    failures = _failures(book, sink, 1)
    reasons = [f["reason"] for f in failures]
    for (kind, (_, fragment)), reason in zip(BAD.items(), reasons):
        assert fragment in reason, (kind, reason)
    assert all(f["kind"] == "rejected" for f in failures)
    undecodable = {"missing-field", "nan-examples", "inf-examples", "fractional-examples",
                   "trained-not-binary", "client-id-out-of-range"}
    assert [f["client_id"] for f in failures] == [  # recorded under the id it claimed
        -1 if kind in undecodable else NUM_GOOD + index for index, kind in enumerate(BAD)]
    assert sum("rejected the reply" in r.message for r in caplog.records) == len(BAD)


# Bad replies whose content, unchecked, moves the global model (the others are inconsistent
# reports - lies about budget, steps, ids - rejected because the reply cannot be trusted).
CORRUPTING = ["wrong-shape", "nan-tensor", "inf-tensor", "absurd-norm", "huge-examples",
              "zero-examples", "negative-examples", "usage-above-one", "importance-above-one",
              "unplanned-expert", "missing-importance"]


@pytest.mark.parametrize("kind", CORRUPTING)
def test_each_bad_reply_would_corrupt_or_crash_an_unvalidated_aggregate(kind):
    """The failure mode exists: aggregated without checks, the bad reply gives another model
    than its honest version (or crashes the round's aggregation or decoding)."""
    global_state = _global_state()
    method = method_for(_strategy(NUM_GOOD + len(BAD))[1])  # the config's method, no checks
    client = NUM_GOOD + list(BAD).index(kind)
    good = [records.parse_train_reply(_content(c, global_state), (2, 4)) for c in range(NUM_GOOD)]
    honest = records.parse_train_reply(_content(client, global_state), (2, 4))
    expected, _ = method.aggregate(global_state, [*good, honest])
    try:
        bad = records.parse_train_reply(_bad_contents(global_state)[kind], (2, 4))
        corrupted, _ = method.aggregate(global_state, [*good, bad])
    except (RuntimeError, ValueError):
        assert kind in ("wrong-shape", "missing-importance")
        return  # the whole round's aggregation fails
    changed = any(corrupted[k].dtype != expected[k].dtype
                  or not torch.equal(corrupted[k], expected[k]) for k in expected)
    assert changed, kind


def test_a_node_cannot_take_another_client_id():
    global_state = _global_state()
    strategy, _, book, sink = _strategy(3)
    _round(strategy, 1, {1: _content(0, global_state), 2: _content(1, global_state),
                         3: _content(2, global_state)}, global_state)
    assert strategy.client_of == {1: 0, 2: 1, 3: 2}
    # round 2: node 1 now claims client 1 (node 2's id); nodes 2 and 3 are honest
    new_state, metrics = _round(strategy, 2, {1: _content(1, global_state),
                                              2: _content(1, global_state),
                                              3: _content(2, global_state)}, global_state)
    reasons = [f["reason"] for f in _failures(book, sink, 2)]
    assert metrics["num-replies"] == 2 and len(reasons) == 1
    assert "node 1 claims client id 1 but replied as client 0 before" in reasons[0]


def test_identity_rules():
    check = validation.check_identity
    check(7, 3, {}, set(), {5, 7})  # a new node with a free id
    with pytest.raises(ValueError, match="belongs to node 5"):
        check(7, 3, {5: 3}, set(), {5, 7})  # node 5, sent this round, holds client 3
    check(7, 3, {5: 3}, set(), {7})  # node 5 is gone (not sent): node 7 takes over client 3
    with pytest.raises(ValueError, match="belongs to node 5"):
        check(7, 3, {5: 3}, set())  # without a sample, every known node counts as present
    with pytest.raises(ValueError, match="replied as client 2 before"):
        check(7, 3, {7: 2}, set(), {7})
    with pytest.raises(ValueError, match="already replied this round"):
        check(7, 3, {}, {3}, {7})


def test_a_rejected_reply_never_blames_another_client():
    blamed = validation.blamed_client
    assert blamed(7, 3, {7: 2}, 10) == 2  # the node's known id, not its new claim
    assert blamed(7, 3, {}, 10) == 3  # a new node: the id it claims
    assert blamed(7, 3, {5: 3}, 10) == -1  # client 3 is node 5: not blamed
    assert blamed(7, 12, {}, 10) == -1


def test_untrained_experts_may_travel_unchanged():
    """Dense uploads (FedAvg) carry experts without gradient bit-identical: accepted."""
    global_state = _global_state()
    upload, result = _honest(0, global_state)
    upload.update({k: v.clone() for k, v in global_state.items() if k not in upload})
    update = records.parse_train_reply(records.train_reply(0, 4, upload, result), (2, 4))
    limits = validation.ReplyLimits(GEOMETRY, 3, 5, True, (SIZE,) * 3, MAX_NORM)
    validation.check_reply(update, global_state, limits)
    changed = next(k for k in global_state if k not in _honest(0, global_state)[0])
    update.state[changed] = update.state[changed] + 1e-6
    with pytest.raises(ValueError, match="unplanned"):
        validation.check_reply(update, global_state, limits)


def test_a_client_that_sat_out_may_report_zero_examples_and_change_nothing():
    global_state = _global_state()
    zeros = torch.zeros(2, 4)
    result = LocalTrainingResult(0, 0.0, zeros.bool(), zeros, None, 0, 0, 0.0, 0)
    limits = validation.ReplyLimits(GEOMETRY, 3, 5, False, (SIZE,) * 3, 0.0)
    update = records.parse_train_reply(records.train_reply(1, 4, {}, result), (2, 4))
    validation.check_reply(update, global_state, limits)
    moved = {"shared.head": global_state["shared.head"] + 1}
    update = records.parse_train_reply(records.train_reply(1, 4, moved, result), (2, 4))
    with pytest.raises(ValueError, match="changed but not trained"):
        validation.check_reply(update, global_state, limits)


def test_max_active_above_budget_is_allowed_for_unbudgeted_methods():
    """FedAvg trains every routed expert whatever the budget (reported as such)."""
    global_state = _global_state()
    upload, result = _honest(0, global_state)
    update = records.parse_train_reply(records.train_reply(0, 2, upload, result), (2, 4))
    unbudgeted = validation.ReplyLimits(GEOMETRY, 3, 5, False, (SIZE,) * 3, 0.0)
    validation.check_reply(update, global_state, unbudgeted)
    with pytest.raises(ValueError, match="exceeds budget-experts"):
        validation.check_reply(update, global_state,
                               validation.ReplyLimits(GEOMETRY, 3, 5, True, (SIZE,) * 3, 0.0))


def test_update_norm_is_the_l2_norm_of_the_delta_over_the_reply():
    global_state = {"a": torch.zeros(2), "b": torch.ones(1)}
    assert validation.update_norm({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([5.0])},
                                  global_state) == pytest.approx(5.0)
    assert validation.update_norm({}, global_state) == 0.0
    assert math.isclose(validation.update_norm({"b": torch.tensor([0.0])}, global_state), 1.0)


@pytest.mark.parametrize("aggregation", ["mean", "clip", "trimmed-mean"])
def test_only_fedavg_and_fedalign_may_exceed_their_budgets_whatever_the_aggregation(aggregation):
    """(fedavg-drop's clients train in full only when their budget holds every expert;
    FedAlign-MoE has no budgets.)"""
    unbudgeted = set()
    for name in METHODS:
        if aggregation == "trimmed-mean" and name in ALIGNING_METHODS:
            continue  # refused by the configuration
        if name in SPLIT_METHODS:
            continue  # no reply of theirs goes through these limits (split_strategy)
        config = parse_run_config({"method": name, "robust.aggregation": aggregation})
        if not validation.ReplyLimits.for_run(config, GEOMETRY, method_for(config),
                                              None).budgeted:
            unbudgeted.add(name)
    fedalign = {"fedalign", "fedalign-no-gate", "fedalign-no-reg", "fedalign-no-consistency"}
    assert unbudgeted == {"fedavg", "fedavg-full", "fedavg-drop"} | (
        fedalign if aggregation != "trimmed-mean" else set())


@pytest.mark.parametrize("method", ["hfedmoe", "fedavg", "fedmoe", "flex", "fedalign"])
def test_the_server_holds_one_upload_at_a_time_and_aggregates_exactly(method, monkeypatch):
    """Streaming aggregation (#17): when the next reply arrives, the uploads of the earlier
    ones are freed (the server holds running sums, not every upload), and the aggregate equals
    the method's batch aggregate of the same updates exactly. fedalign needs every upload at
    once (consistency of each expert's copies) and is collected: the probe sees them held."""
    global_state = _global_state()
    strategy, config, book, sink = _strategy(4, method=method)
    grid = InProcessGrid(client_app=None, num_nodes=4)
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, records.to_array_record(global_state), ConfigRecord(), grid)}
    uploads = []  # weak references to one parsed tensor of each reply
    parse = records.parse_train_reply

    def watched_parse(content, shape):
        update = parse(content, shape)
        uploads.append(weakref.ref(next(iter(update.state.values()))))
        return update
    monkeypatch.setattr(records, "parse_train_reply", watched_parse)
    held = []

    def replies():  # made one by one, as replies arrive
        for node in sorted(instructions):
            gc.collect()
            held.append(sum(ref() is not None for ref in uploads))
            yield Message(_content(node - 1, global_state), reply_to=instructions[node])

    new_arrays, metrics = strategy.aggregate_train(1, replies())
    assert metrics["num-replies"] == 4
    assert held == ([0, 1, 2, 3] if method == "fedalign" else [0, 0, 0, 0])
    expected, _ = method_for(config).aggregate(
        global_state, [parse(_content(c, global_state), (2, 4)) for c in range(4)])
    new_state = records.from_array_record(new_arrays)
    assert all(torch.equal(new_state[k], expected[k]) for k in expected)
    book.evaluated(1, 0.0, 0.0)
    assert [c["uploaded_tensors"] for c in sink.rounds[-1]["clients"]] == [
        len(parse(_content(c, global_state), (2, 4)).state) for c in range(4)]
