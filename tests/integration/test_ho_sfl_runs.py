"""Split learning end to end, in-process (issue #16): ho-sfl lowers the loss and moves the
client part with P scalars per client and round whatever the model size; sfl and zo-sfl run in
the same harness with their own traffic; a client lost between the two exchanges is left out
of the client part's update without breaking the round."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hfedmoe import checkpoint as ckpt
from hfedmoe.client import build_model
from hfedmoe.config import ConfigError, load_config_file, parse_run_config
from hfedmoe.faults import failing_clients
from hfedmoe.model.state import read_state, set_trainable
from hfedmoe.report import read_metrics
from hfedmoe.runner import run_experiment

pytestmark = pytest.mark.slow
ROUNDS = 6
P = 3


def _config(out, method, **overrides):
    return parse_run_config(load_config_file("conf/tiny.toml"), {
        "method": method, "out": str(out), "num-server-rounds": ROUNDS,
        "train.batch-size": 16, "train.lr": 0.003, "ho-sfl.directions": P,
        "ho-sfl.client-lr": 0.01, "checkpoint.every": ROUNDS, "checkpoint.keep": 1,
        "data.client-test-fraction": 0.0, **overrides})


def _client_part(out):
    state = ckpt.load_latest(out / ckpt.CHECKPOINT_DIR).global_state
    return {k: v for k, v in state.items() if k.startswith(("expert.0.", "router.0."))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    done = {}
    for method in ("ho-sfl", "sfl", "zo-sfl"):
        out = tmp_path_factory.mktemp(method) / "run"
        done[method] = (out, run_experiment(_config(out, method)))
    return done


def test_ho_sfl_lowers_the_loss_and_uploads_p_scalars(runs):
    out, summary = runs["ho-sfl"]
    assert summary["final_loss"] < summary["loss_by_round"][0]
    records = read_metrics(out)[1:]
    clients = len(records[0]["clients"])
    assert clients == 3
    for record in records:  # model-update traffic: P float64 scalars per client, no tensor
        assert record["bytes_up_updates"] == clients * P * 8
        assert record["bytes_up_activations"] > 0
        assert record["bytes_up"] == record["bytes_up_activations"] + record["bytes_up_updates"]
    assert summary["bytes_up_updates"] == ROUNDS * clients * P * 8


def test_the_client_part_moves_under_ho_sfl(runs, tmp_path):
    out, _ = runs["ho-sfl"]
    initial = _config(tmp_path, "ho-sfl")  # the initial model: built from the run's seed
    adapter = build_model(initial, num_labels=5)
    start = read_state(set_trainable(adapter, initial.model.trainable_non_expert))
    trained = _client_part(out)
    assert trained and any(not torch.equal(trained[k], start[k]) for k in trained)


def test_baselines_run_in_the_same_harness_with_their_own_traffic(runs):
    ho_records = read_metrics(runs["ho-sfl"][0])[1:]
    sfl_records = read_metrics(runs["sfl"][0])[1:]
    zo_records = read_metrics(runs["zo-sfl"][0])[1:]
    client_part = sum(v.numel() for v in _client_part(runs["sfl"][0]).values())
    for ho, sfl, zo in zip(ho_records, sfl_records, zo_records):
        # sfl uploads theta_c's gradient (float32, every key), zo-sfl nothing but activations
        assert sfl["bytes_up_updates"] >= 3 * client_part * 4
        assert zo["bytes_up_updates"] == 0
        # zo-sfl sends z at theta and at P perturbations: (P + 1) x ho-sfl's z, same mask/labels
        assert zo["bytes_up_activations"] > P * ho["bytes_up_activations"]
        assert sfl["bytes_up_activations"] == ho["bytes_up_activations"]
    for method in ("sfl", "zo-sfl"):
        summary = runs[method][1]
        assert summary["final_loss"] < summary["loss_by_round"][0]


def test_a_client_lost_between_the_exchanges_is_left_out(tmp_path):
    config = _config(tmp_path / "run", "ho-sfl", **{
        "num-server-rounds": 2, "faults.client-failure-rate": 0.34})  # 1 of 3 per round
    summary = run_experiment(config)
    assert summary["rounds"] == 2
    for record in read_metrics(tmp_path / "run")[1:]:
        lost = failing_clients(config.seed, record["round"], 3, 0.34)
        assert len(lost) == 1
        assert [f["client_id"] for f in record["failures"]] == sorted(lost)
        assert "zo:" in record["failures"][0]["reason"]
        # its activations trained the server part; its scalars are missing from the average
        completed = {c["client_id"]: c["completed"] for c in record["clients"]}
        assert completed == {c: c not in lost for c in range(3)}
        assert record["bytes_up_updates"] == 2 * P * 8
        assert record["aggregated"] is True


def test_split_settings_are_checked_before_the_run(tmp_path):
    with pytest.raises(ConfigError, match="ho-sfl.split-layer"):
        run_experiment(_config(tmp_path, "ho-sfl", **{"ho-sfl.split-layer": 2}))


def test_a_resumed_ho_sfl_run_ends_where_the_uninterrupted_one_does(runs, tmp_path):
    """Half the rounds, then resumed to all of them: both server-held AdamW states come back
    from the checkpoint, so the final model and the later rounds' losses are the
    uninterrupted run's exactly (fresh optimizers would step differently)."""
    full_out, full = runs["ho-sfl"]
    out = tmp_path / "run"
    run_experiment(_config(out, "ho-sfl", **{"num-server-rounds": ROUNDS // 2,
                                             "checkpoint.every": 1}))
    saved = ckpt.load_latest(out / ckpt.CHECKPOINT_DIR).optimizer_state
    assert set(saved) == {"server", "client"} and saved["server"]["state"]
    # a checkpoint without the optimizer states (written before they were kept) is refused
    older = tmp_path / "older"
    shutil.copytree(out, older)
    newest = max((older / ckpt.CHECKPOINT_DIR).glob("round-*"))
    (newest / ckpt.OPTIMIZER_FILE).unlink()
    manifest = json.loads((newest / ckpt.MANIFEST_FILE).read_text())
    del manifest[ckpt.OPTIMIZER_FILE]
    (newest / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="no server-part optimizer state"):
        run_experiment(_config(older, "ho-sfl", **{"checkpoint.resume": True}))
    resumed = run_experiment(_config(out, "ho-sfl", **{"checkpoint.resume": True}))
    assert resumed["loss_by_round"] == full["loss_by_round"]
    final, expected = (ckpt.load_latest(o / ckpt.CHECKPOINT_DIR).global_state
                       for o in (out, full_out))
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_active_experts_moves_only_the_experts_the_clients_selected(tmp_path):
    out = tmp_path / "run"
    config = _config(out, "ho-sfl", **{"num-server-rounds": 1, "checkpoint.every": 1,
                                       "ho-sfl.active-experts": True, "budget.experts": "25%"})
    run_experiment(config)
    record = read_metrics(out)[1]
    moved = torch.zeros(2, 8, dtype=torch.bool)
    for client in record["clients"]:
        trained = torch.tensor(client["trained_experts"]).reshape(2, 8).bool()
        # 25% of the 16 experts = 4 -> the same share of the client part's 8 = 2, layer 0 only
        assert int(trained.sum()) == 2 and not trained[1].any()
        moved |= trained
    assert record["bytes_up_updates"] == 3 * (P * 8 + 16)  # scalars + the (L, S) mask
    adapter = build_model(config, num_labels=5)
    start = read_state(set_trainable(adapter, config.model.trainable_non_expert))
    after = ckpt.load_latest(out / ckpt.CHECKPOINT_DIR).global_state
    for expert in range(8):
        keys = [k for k in after if k.startswith(f"expert.0.{expert}.")]
        same = all(torch.equal(after[k], start[k]) for k in keys)
        assert same != bool(moved[0, expert]), expert  # moved iff some client selected it
    assert not torch.equal(after["router.0.weight"], start["router.0.weight"])  # always moved


def test_with_lora_the_client_part_is_its_experts_factors(tmp_path):
    out = tmp_path / "run"
    config = _config(out, "ho-sfl", **{"num-server-rounds": 1, "checkpoint.every": 1,
                                       "train.adapter": "lora", "lora.rank": 4})
    summary = run_experiment(config)
    assert summary["bytes_up_updates"] == 3 * P * 8
    after = _client_part(out)
    experts = [k for k in after if k.startswith("expert.")]
    assert experts and all(".lora." in k for k in experts)  # the factors, not the weights
    adapter = build_model(config, num_labels=5)
    start = read_state(set_trainable(adapter, config.model.trainable_non_expert))
    assert any(not torch.equal(after[k], start[k]) for k in experts)
