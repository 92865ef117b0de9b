"""fedmoe and flex on a real tiny MoE and real Flower messages; personalised evaluation.

- the routing probe's counts equal an independent recount, and fedmoe's sub-MoE is the top-C;
- flex uploads no expert, keeps its personal experts in the node's ``context.state``, and its
  round-2 personal experts continue from round 1;
- the personalised accuracy in metrics.jsonl is the mean of the per-client values, each of
  which is re-computed here from the checkpointed global model and the client's test split.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message, MessageType

from hfedmoe.checkpoint import load_latest
from hfedmoe.client import ClientResources, build_model, run_client_round
from hfedmoe.config import load_config_file, parse_run_config
from hfedmoe.data import client_split, client_split_sizes, eval_batches, load_corpus, tokenize
from hfedmoe.federation import records
from hfedmoe.federation.client_app import make_client_app
from hfedmoe.federation.grids import InProcessGrid
from hfedmoe.model import load_tokenizer
from hfedmoe.model.state import expert_of, parse_key, read_state, set_trainable, write_state
from hfedmoe.report import read_metrics
from hfedmoe.runner import run_experiment
from hfedmoe.strategies import method_for, plan_round
from hfedmoe.training import routing_counts


def _config(method, tmp_path=None, **overrides):
    return parse_run_config(load_config_file("conf/tiny.toml"), {
        "method": method, "budget.experts": "2,4,16", "train.local-steps": 2,
        **({"out": str(tmp_path / method)} if tmp_path else {}), **overrides})


def _setup(config, partition_id=0):
    corpus = load_corpus(config.data)
    train, test = client_split(corpus, config.data, config.seed, partition_id)
    tokenizer = load_tokenizer(config.model)
    adapter = build_model(config, len(corpus.label_names))
    params = set_trainable(adapter, config.model.trainable_non_expert)
    return (adapter, params, tokenize(train, tokenizer, config.model.max_length),
            tokenize(test, tokenizer, config.model.max_length))


def test_probe_counts_are_top_k_of_router_probabilities_and_fedmoe_holds_the_top_c():
    config = _config("fedmoe")
    adapter, _, train, _ = _setup(config)
    g = adapter.geometry
    counts = routing_counts(adapter, train, 32)
    # independent recount: top-k of the router probabilities of every real token
    recount = torch.zeros(g.num_layers, g.num_experts, dtype=torch.int64)
    with torch.no_grad():
        for batch in eval_batches(train, 32):
            with adapter.trace_routing() as trace:
                adapter.model(batch["input_ids"], batch["attention_mask"])
            real = batch["attention_mask"].reshape(-1).bool()
            for layer, probs in enumerate(trace.probabilities):
                top = probs[real].topk(g.top_k, dim=-1).indices.reshape(-1)
                recount[layer] += torch.bincount(top, minlength=g.num_experts)
    assert torch.equal(counts, recount)
    assert int(counts.sum()) == g.num_layers * g.top_k * int(train.attention_mask.sum())
    held = plan_round(method_for(config), 5, g, 0, lambda: counts, {}).selector.held
    ranked = sorted(((-int(counts[l, e]), l, e) for l in range(g.num_layers)
                     for e in range(g.num_experts)))[:5]
    assert {tuple(x) for x in torch.nonzero(held).tolist()} == {(l, e) for _, l, e in ranked}


def _train_message(config, server_round, global_state, node_id):
    content = records.train_instruction(server_round, config.to_flat(),
                                        records.to_array_record(global_state))
    return Message(content, node_id, MessageType.TRAIN, group_id=str(server_round))


def test_flex_keeps_personal_experts_in_the_node_state_and_continues_from_them():
    config = _config("flex")
    adapter, params, _, _ = _setup(config)
    global_state = read_state(params)
    grid = InProcessGrid(make_client_app(), 3)
    node_state = grid._contexts[1].state  # the Context Flower keeps for node 1 (client 0)
    replies = []
    for server_round in (1, 2):
        [reply] = grid.send_and_receive([_train_message(config, server_round, global_state, 1)])
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        replies.append(reply)
        if server_round == 1:
            first = records.personal_state(node_state)
    second = records.personal_state(node_state)
    for reply in replies:  # no expert and no router ever travels; only shared trainables
        update = reply.content.array_records[records.UPDATE]
        assert update and all(parse_key(key).kind == "shared" for key in update)
    experts = {expert_of(k) for k in first if expert_of(k) is not None}
    assert len(experts) == 2 and len({layer for layer, _ in experts}) == 2  # one per layer
    assert set(first) == set(second)  # the same personal experts, kept across rounds
    assert {k for k in first if parse_key(k).kind == "router"} == \
        {k for k in global_state if parse_key(k).kind == "router"}
    for key in first:  # round 1 trained them away from the pretrained/global values
        assert not torch.equal(first[key], global_state[key]), key
        assert not torch.equal(second[key], first[key]), key
    # round 2 continued from round 1's personal state: re-running it from `first` gives
    # exactly `second`; starting from the global state instead (forgetting) does not
    resumed = run_client_round(config, 0, 2, global_state, resources=ClientResources(),
                               personal=first)
    forgot = run_client_round(config, 0, 2, global_state, resources=ClientResources())
    for key in second:
        assert torch.equal(resumed.personal[key], second[key]), key
    assert any(not torch.equal(forgot.personal[key], second[key]) for key in second)
    # the personalised evaluation loads the personal state over the global one
    content = records.evaluate_instruction(3, config.to_flat(),
                                           records.to_array_record(global_state))
    [reply] = grid.send_and_receive([Message(content, 1, MessageType.EVALUATE, group_id="3")])
    result = records.parse_evaluate_reply(reply.content)
    _, _, _, test = _setup(config)
    assert result.client_id == 0 and result.num_examples == len(test)
    assert result.accuracy == pytest.approx(
        _manual_accuracy(adapter, params, {**global_state, **second}, test))


def _manual_accuracy(adapter, params, state, test):
    write_state(params, state)
    correct = 0
    with torch.no_grad():
        for batch in eval_batches(test, 7):
            logits = adapter.model(batch["input_ids"], batch["attention_mask"])
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(test)


@pytest.mark.parametrize("method", ["fedmoe", "flex"])
def test_personal_accuracy_is_the_mean_of_recomputed_per_client_accuracies(tmp_path, method):
    config = _config(method, tmp_path)
    summary = run_experiment(config)
    metrics = read_metrics(tmp_path / method)
    corpus = load_corpus(config.data)
    test_sizes = [t for _, t in client_split_sizes(corpus.train.labels, config.data, config.seed)]
    assert metrics[0]["personal_accuracy"] is None  # round 0: nothing personal yet
    for record in metrics[1:]:
        entries = record["personal"]
        assert [e["client_id"] for e in entries] == [0, 1, 2]
        assert [e["num_examples"] for e in entries] == test_sizes
        accuracies = [e["accuracy"] for e in entries]
        assert record["personal_accuracy"] == pytest.approx(sum(accuracies) / 3)
        assert record["personal_accuracy_weighted"] == pytest.approx(
            sum(a * n for a, n in zip(accuracies, test_sizes)) / sum(test_sizes))
    assert summary["personal_accuracy_by_round"] == [r["personal_accuracy"] for r in metrics]
    assert summary["final_personal_accuracy"] == metrics[-1]["personal_accuracy"]
    # independent re-computation of every client's value from the final global model
    final = load_latest(tmp_path / method / "checkpoints")
    assert final is not None and final.server_round == 2
    for entry in metrics[-1]["personal"]:
        adapter, params, _, test = _setup(config, entry["client_id"])
        if method == "fedmoe":  # no personal state: the global model on the client's split
            expected = _manual_accuracy(adapter, params, final.global_state, test)
            assert entry["accuracy"] == pytest.approx(expected)
        # flex: the personal state lives on the node (checked with it in the test above)
    if method == "flex":  # the global experts and routers are the pretrained ones, bit for bit
        _, params, _, _ = _setup(config)
        initial = read_state(params)
        frozen = [k for k in initial if parse_key(k).kind != "shared"]
        assert frozen and all(torch.equal(final.global_state[k], initial[k]) for k in frozen)
        assert any(not torch.equal(final.global_state[k], initial[k])
                   for k in initial if parse_key(k).kind == "shared")


def test_bad_evaluate_replies_are_counted_not_averaged(tmp_path):
    from flwr.clientapp import ClientApp

    from hfedmoe.federation.server_app import run_server

    real, app = make_client_app(), ClientApp()

    @app.train()
    def train(msg, context):
        return real(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        honest = real(msg, context)
        partition = int(context.node_config["partition-id"])
        if partition == 1:  # an impossible accuracy
            return Message(records.evaluate_reply(1, 5, 1.7, 0.1), reply_to=msg)
        if partition == 2:  # speaks for client 0
            return Message(records.evaluate_reply(0, 5, 1.0, 0.1), reply_to=msg)
        return honest

    config = _config("fedmoe", tmp_path, **{"train.local-steps": 1})
    run_server(InProcessGrid(app, 3), config)
    for record in read_metrics(tmp_path / "fedmoe")[1:]:
        assert [e["client_id"] for e in record["personal"]] == [0]
        assert record["personal_failures"] == 2
        assert record["personal_accuracy"] == record["personal"][0]["accuracy"] < 1.0
