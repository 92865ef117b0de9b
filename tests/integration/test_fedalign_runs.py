"""fedalign end to end, in-process: the aligned routing distribution travels from round 2 on
(clients then report the regulariser, the bytes count it), and a resumed run continues with
the checkpoint's routing target, exactly as the uninterrupted run."""

import json

import pytest
import torch

from hfedmoe import checkpoint as ckpt
from hfedmoe.config import load_config_file, parse_run_config
from hfedmoe.federation.records import record_bytes, to_array_record
from hfedmoe.report import read_metrics
from hfedmoe.runner import run_experiment

pytestmark = pytest.mark.slow
ROUNDS = 3


def _run(out, rounds, resume=False, **overrides):
    config = parse_run_config(load_config_file("conf/tiny.toml"), {
        "method": "fedalign", "out": str(out), "num-server-rounds": rounds,
        "train.local-steps": 3, "checkpoint.keep": 10, "checkpoint.resume": resume,
        "fedalign.routing-weight": 1.0,
        # the resumed run is 2 rounds extended to 4: equal to the whole run only under a
        # constant lr (under cosine every round's lr depends on num-server-rounds)
        "train.lr-schedule": "constant", **overrides})
    return run_experiment(config)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    summary = _run(out, ROUNDS)
    return out, summary


def test_the_routing_target_travels_from_round_two(whole):
    out, summary = whole
    assert summary["final_loss"] < summary["loss_by_round"][0]
    records = read_metrics(out)
    first, second = records[1], records[2]
    assert all("routing_loss" not in c for c in first["clients"])  # no target yet
    assert all(c["routing_loss"] > 0 for c in second["clients"])
    assert 0 < second["routing_target_entropy"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
    # round 2 sends the (L, S) target with each instruction: 2 layers x 8 experts of float32
    target_bytes = record_bytes(to_array_record({"routing-target": torch.zeros(2, 8)}))
    sampled = len(second["clients"])
    assert second["bytes_down_train"] - first["bytes_down_train"] == sampled * target_bytes
    saved = ckpt.load_latest(out / ckpt.CHECKPOINT_DIR).strategy_state["guidance"]
    target = ckpt.tensors_from_json(saved)["routing-target"]
    assert target.shape == (2, 8) and torch.allclose(target.sum(dim=1), torch.ones(2))


def test_a_resumed_run_continues_with_the_saved_target(tmp_path, whole):
    out, _ = whole
    broken = tmp_path / "broken"
    _run(broken, 2)
    _run(broken, ROUNDS, resume=True)
    ours = ckpt.load_latest(broken / ckpt.CHECKPOINT_DIR).global_state
    theirs = ckpt.load_latest(out / ckpt.CHECKPOINT_DIR).global_state
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    lines = [json.loads(l) for l in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [c["routing_loss"] for c in lines[-1]["clients"]] == \
        [c["routing_loss"] for c in read_metrics(out)[-1]["clients"]]
