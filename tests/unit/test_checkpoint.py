"""Atomic checkpoints: round trip, and every kind of incomplete checkpoint falls back to the
previous complete one."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from hfedmoe import checkpoint as ckpt


def _checkpoint(server_round: int, value: float) -> ckpt.Checkpoint:
    return ckpt.Checkpoint(
        server_round=server_round,
        global_state={"expert.0.1.w": torch.full((3, 2), value), "router.0.weight": torch.ones(4)},
        records=[{"round": r, "accuracy": r / 10} for r in range(server_round + 1)],
        elapsed_seconds=12.5 * server_round,
        run_config={"seed": 3, "method": "hfedmoe", "num-server-rounds": 5},
        strategy_state={"retries": 1},
    )


def test_round_trip_restores_state_records_and_rng(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = ckpt.save_checkpoint(tmp_path, _checkpoint(2, 0.5), keep=2)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = ckpt.load_latest(tmp_path)
    assert saved.name == "round-000002" and loaded.server_round == 2
    assert torch.equal(loaded.global_state["expert.0.1.w"], torch.full((3, 2), 0.5))
    assert loaded.records[-1] == {"round": 2, "accuracy": 0.2}
    assert loaded.elapsed_seconds == 25.0 and loaded.strategy_state == {"retries": 1}
    ckpt.restore_rng_states(loaded.rng)  # the draws after the save repeat exactly
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_optimizer_states_round_trip_and_older_checkpoints_have_none(tmp_path):
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.tensor([0.5, 0.25])
    optimizer.step()
    state = {"server": optimizer.state_dict()}
    saved = ckpt.save_checkpoint(tmp_path, replace(_checkpoint(2, 0.5), optimizer_state=state),
                                 keep=2)
    loaded = ckpt.load_latest(tmp_path).optimizer_state["server"]
    moments = loaded["state"][0]
    assert torch.equal(moments["exp_avg"], optimizer.state[param]["exp_avg"])
    assert torch.equal(moments["exp_avg_sq"], optimizer.state[param]["exp_avg_sq"])
    assert loaded["param_groups"][0]["lr"] == 0.1
    # a checkpoint written before optimizer.pt existed: its manifest does not name the file
    (saved / ckpt.OPTIMIZER_FILE).unlink()
    manifest = json.loads((saved / ckpt.MANIFEST_FILE).read_text())
    del manifest[ckpt.OPTIMIZER_FILE]
    (saved / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    older = ckpt.load_latest(tmp_path)
    assert older.server_round == 2 and older.optimizer_state == {}


@pytest.mark.parametrize("damage", ["no-commit", "truncated-model", "altered-state",
                                    "missing-rng", "bad-manifest", "truncated-optimizer"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    ckpt.save_checkpoint(tmp_path, _checkpoint(1, 1.0), keep=3)
    newest = ckpt.save_checkpoint(tmp_path, _checkpoint(2, 2.0), keep=3)
    assert ckpt.load_latest(tmp_path).server_round == 2
    if damage == "no-commit":
        (newest / ckpt.COMMIT_FILE).unlink()
    elif damage == "truncated-model":
        data = (newest / ckpt.MODEL_FILE).read_bytes()
        (newest / ckpt.MODEL_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "altered-state":
        state = json.loads((newest / ckpt.STATE_FILE).read_text())
        state["server_round"] = 7
        (newest / ckpt.STATE_FILE).write_text(json.dumps(state))
    elif damage == "missing-rng":
        (newest / ckpt.RNG_FILE).unlink()
    elif damage == "truncated-optimizer":
        data = (newest / ckpt.OPTIMIZER_FILE).read_bytes()
        (newest / ckpt.OPTIMIZER_FILE).write_bytes(data[:-3])
    else:
        (newest / ckpt.MANIFEST_FILE).write_text("{not json")
    loaded = ckpt.load_latest(tmp_path)
    assert loaded.server_round == 1
    assert torch.equal(loaded.global_state["expert.0.1.w"], torch.full((3, 2), 1.0))


def test_partial_directories_are_ignored_and_old_checkpoints_pruned(tmp_path):
    for server_round in range(1, 5):
        ckpt.save_checkpoint(tmp_path, _checkpoint(server_round, float(server_round)), keep=2)
    (tmp_path / "round-000005.partial").mkdir()  # a write that died before its rename
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["round-000003", "round-000004", "round-000005.partial"]
    assert ckpt.load_latest(tmp_path).server_round == 4
    assert ckpt.load_latest(tmp_path / "missing") is None


def test_resume_may_change_only_rounds_runtime_and_timeouts():
    saved = {"seed": 0, "num-server-rounds": 3, "simulation.runtime": "ray", "train.lr": 0.1,
             "federation.round-timeout": 60.0, "checkpoint.resume": False}
    ckpt.check_resumable(saved, {**saved, "num-server-rounds": 9, "simulation.runtime":
                                 "inprocess", "federation.round-timeout": 5.0,
                                 "checkpoint.resume": True})
    with pytest.raises(ValueError, match="'train.lr' = 0.2 differs from the checkpoint's 0.1"):
        ckpt.check_resumable(saved, {**saved, "train.lr": 0.2})
