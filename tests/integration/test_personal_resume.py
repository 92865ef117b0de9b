"""A resumed run continues each client's personal state (flex) from the client's own disk
(hfedmoe.personal_store): its personalised accuracy per round equals the uninterrupted run's.

In-process runtime: the resumed run is a new Flower run whose node Contexts start empty, as
after a server restart. The control deletes the clients' stored states before resuming: the
personal experts then start over, and the personalised accuracy departs from the
uninterrupted run's (so the equality is not an accident of the tiny model).
"""

import json
import shutil

import pytest

from hfedmoe.config import load_config_file, parse_run_config
from hfedmoe.personal_store import CLIENT_STATE_DIR
from hfedmoe.runner import run_experiment

ROUNDS = 4
COMPARED = ("round", "accuracy", "personal_accuracy")


def _run(out, rounds, resume=False):
    config = parse_run_config(load_config_file("conf/tiny.toml"), {
        "method": "flex", "out": str(out), "num-server-rounds": rounds,
        "budget.experts": "2,4,16", "train.local-steps": 3, "checkpoint.keep": 10,
        "checkpoint.resume": resume,
        # the broken run is 2 rounds extended to 4: equal to the whole run only under a
        # constant lr (under cosine every round's lr depends on num-server-rounds)
        "train.lr-schedule": "constant"})
    run_experiment(config)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in COMPARED} for line in lines if line.strip()]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("whole") / "run", ROUNDS)


def test_resumed_flex_run_continues_the_personal_experts(tmp_path, whole):
    out = tmp_path / "broken"
    _run(out, 2)
    stored = sorted(p.name for p in (out / CLIENT_STATE_DIR).glob("*/client-*"))
    assert stored == ["client-0", "client-1", "client-2"]  # one lineage, every client
    assert _run(out, ROUNDS, resume=True) == whole
    assert len({p.parent.name for p in (out / CLIENT_STATE_DIR).glob("*/client-*")}) == 1


def test_without_the_stored_state_the_resumed_run_departs(tmp_path, whole):
    out = tmp_path / "forgot"
    _run(out, 2)
    shutil.rmtree(out / CLIENT_STATE_DIR)
    resumed = _run(out, ROUNDS, resume=True)
    assert resumed[:3] == whole[:3]  # rounds 0-2 come from the checkpoint
    assert [r["personal_accuracy"] for r in resumed[3:]] != \
        [r["personal_accuracy"] for r in whole[3:]]


def test_a_new_run_in_the_same_directory_starts_its_personal_state_over(tmp_path, whole):
    out = tmp_path / "again"
    _run(out, 2)
    first = {p.parent.name for p in (out / CLIENT_STATE_DIR).glob("*/client-*")}
    assert _run(out, ROUNDS) == whole  # not resumed: the earlier states are deleted, unused
    assert {p.parent.name for p in (out / CLIENT_STATE_DIR).glob("*/client-*")}.isdisjoint(first)
