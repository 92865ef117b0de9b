"""Client-side (personalised) evaluation that scales: every k-th round and the last, on a
seeded sample of the clients; the centralised evaluation still runs every round."""

from __future__ import annotations

import json
from pathlib import Path

from hfedmoe.cli import main

ROOT = Path(__file__).resolve().parents[2]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_personal_evaluation_every_k_rounds_on_a_sample(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--config", str(ROOT / "conf/tiny.toml"), "--set", "data.num-clients=4",
            "--set", "num-server-rounds=3", "--set", "train.evaluate-every=2",
            "--set", "train.fraction-evaluate=0.5", "--set", "checkpoint.every=0",
            "--out", str(out)]
    assert main(args) == 0
    by_round = {r["round"]: r for r in records(out)}
    assert all(by_round[r]["accuracy"] is not None for r in range(4))  # central: every round
    assert by_round[1]["personal_accuracy"] is None  # not a multiple of 2, not the last
    evaluated = {r: [p["client_id"] for p in by_round[r]["personal"]] for r in (2, 3)}
    assert all(len(ids) == 2 for ids in evaluated.values())  # half of the 4 clients
    for r, ids in evaluated.items():
        accuracies = [p["accuracy"] for p in by_round[r]["personal"]]
        assert by_round[r]["personal_accuracy"] == sum(accuracies) / 2
    # every byte counted: the evaluation instructions carry the global state to 2 clients
    state_bytes = by_round[2]["clients"][0]["bytes_down"]  # one train instruction
    assert by_round[1]["bytes_down_evaluate"] == 0
    for r in (2, 3):
        assert by_round[r]["bytes_down_evaluate"] == 2 * state_bytes
        assert by_round[r]["bytes_down"] == by_round[r]["bytes_down_train"] + 2 * state_bytes
    # the same seed samples the same clients again (a second run of the same config)
    again = tmp_path / "again"
    assert main(args[:-1] + [str(again)]) == 0
    assert {r["round"]: [p["client_id"] for p in r.get("personal") or []]
            for r in records(again)} == {r["round"]: [p["client_id"] for p in r.get("personal")
                                                       or []] for r in records(out)}


def _array_bytes(message) -> int:
    """Serialised bytes of every array a message carries, as the ClientApp got them."""
    return sum(len(array.data) for record in message.content.array_records.values()
               for array in record.values())


def test_with_100_connected_and_10_sampled_only_the_sampled_nodes_get_messages(tmp_path):
    """N = 100 connected, K = 10 sampled for training and for evaluation, in-process: every
    message a node receives is counted at the ClientApp, apart from the server's accounting."""
    from flwr.clientapp import ClientApp

    from hfedmoe.config import load_config_file, parse_run_config
    from hfedmoe.federation.client_app import make_client_app
    from hfedmoe.federation.grids import InProcessGrid
    from hfedmoe.federation.server_app import run_server

    real, counting, received = make_client_app(), ClientApp(), []

    def delegate(kind):
        def handle(msg, context):
            reply = real(msg, context)
            received.append({"kind": kind, "node": context.node_config["partition-id"],
                             "round": int(msg.content.config_records["plan"]["server-round"]),
                             "down": _array_bytes(msg), "up": _array_bytes(reply)})
            return reply
        return handle

    counting.train()(delegate("train"))
    counting.evaluate()(delegate("evaluate"))
    counting.query()(delegate("query"))
    config = parse_run_config(load_config_file(ROOT / "conf/tiny.toml"), {
        "out": str(tmp_path / "run"), "data.num-clients": 100, "data.partition": "iid",
        "data.min-partition-size": 1, "train.fraction-train": 0.1,
        "train.fraction-evaluate": 0.1, "train.local-steps": 1, "num-server-rounds": 2,
        "checkpoint.every": 0})
    summary = run_server(InProcessGrid(counting, 100), config)
    by_round = {r["round"]: r for r in records(tmp_path / "run")}
    for r in (1, 2):
        got = [m for m in received if m["round"] == r]
        trained = sorted(m["node"] for m in got if m["kind"] == "train")
        evaluated = sorted(m["node"] for m in got if m["kind"] == "evaluate")
        assert len(trained) == len(set(trained)) == 10  # ten nodes, once each
        assert len(evaluated) == len(set(evaluated)) == 10
        assert trained == sorted(c["client_id"] for c in by_round[r]["clients"])
        assert set(p["client_id"] for p in by_round[r]["personal"]) <= set(evaluated)
        # the round's bytes are exactly the sum over its messages, by kind
        assert by_round[r]["bytes_down_train"] == sum(m["down"] for m in got
                                                      if m["kind"] == "train")
        assert by_round[r]["bytes_down_evaluate"] == sum(m["down"] for m in got
                                                         if m["kind"] == "evaluate")
        assert by_round[r]["bytes_up"] == sum(m["up"] for m in got) > 0
    # the 90 others received nothing but, once, the question which client they are (the
    # sample is drawn over client ids: node ids are random on Ray and in deployment)
    queries = [m for m in received if m["kind"] == "query"]
    assert sorted(m["node"] for m in queries) == list(range(100))
    assert {m["round"] for m in queries} == {1} and all(m["down"] == m["up"] == 0
                                                         for m in queries)
    assert len(received) == 2 * (10 + 10) + 100
    assert summary["bytes_down"] == sum(m["down"] for m in received)
    assert summary["bytes_up"] == sum(m["up"] for m in received)
