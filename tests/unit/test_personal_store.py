"""hfedmoe.personal_store: rounds on disk, the newest at or before a round, pruning."""

import torch
from flwr.app import Context, RecordDict

from hfedmoe.config import parse_run_config
from hfedmoe.federation import records
from hfedmoe.federation.client_app import personal_state as client_personal_state
from hfedmoe.federation.client_app import personal_store
from hfedmoe.personal_store import CLIENT_STATE_DIR, PersonalStore, rounds_to_keep


def test_load_gives_the_newest_round_at_or_before(tmp_path):
    store = PersonalStore.for_client(tmp_path, "abc", 3)
    assert store.directory == tmp_path / "abc" / "client-3"
    assert store.rounds() == [] and store.load(10) == {}
    for server_round in (2, 5):
        store.save(server_round, {"expert.0.1.w": torch.full((2,), float(server_round))})
    assert store.rounds() == [2, 5]
    assert store.load(1) == {}
    assert torch.equal(store.load(4)["expert.0.1.w"], torch.full((2,), 2.0))
    assert torch.equal(store.load(5)["expert.0.1.w"], torch.full((2,), 5.0))
    assert not list(store.directory.glob("*.partial"))


def test_only_the_newest_rounds_are_kept_and_clients_are_apart(tmp_path):
    store = PersonalStore.for_client(tmp_path, "abc", 0)
    for server_round in range(1, 6):
        store.save(server_round, {"w": torch.tensor([float(server_round)])})
    assert store.rounds() == [4, 5]
    # checkpoints every 3 rounds: after round 5, the newest checkpoint may be round 2's, whose
    # resumption needs the state of round 2 - kept with rounds_to_keep(3) = 4 rounds
    assert rounds_to_keep(0) == 2 and rounds_to_keep(1) == 2 and rounds_to_keep(3) == 4
    sparse = PersonalStore.for_client(tmp_path, "sparse", 0, keep=rounds_to_keep(3))
    for server_round in range(1, 6):
        sparse.save(server_round, {"w": torch.tensor([float(server_round)])})
    assert sparse.rounds() == [2, 3, 4, 5] and float(sparse.load(2)["w"]) == 2.0
    other = PersonalStore.for_client(tmp_path, "abc", 1)
    assert other.load(5) == {}
    assert PersonalStore.for_client(tmp_path, "new-run", 0).load(5) == {}


def _context(node_config):
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_the_client_keeps_its_state_where_its_node_config_says(tmp_path):
    config = parse_run_config({"out": str(tmp_path / "run"), "checkpoint.every": 3})
    default = personal_store(_context({"partition-id": 2}), config, 2, "abc")
    assert default.directory == tmp_path / "run" / CLIENT_STATE_DIR / "abc" / "client-2"
    assert default.keep == 4
    own = personal_store(_context({"partition-id": 2, "state-dir": str(tmp_path / "node")}),
                         config, 2, "abc")
    assert own.directory == tmp_path / "node" / "abc" / "client-2"
    assert personal_store(_context({"partition-id": 2}), config, 2, "") is None  # no lineage


def test_the_context_wins_over_the_disk_and_the_disk_fills_an_empty_context(tmp_path):
    store = PersonalStore.for_client(tmp_path, "abc", 0)
    store.save(3, {"w": torch.tensor([3.0])})
    empty = _context({"partition-id": 0})
    assert torch.equal(client_personal_state(empty, store, 3)["w"], torch.tensor([3.0]))
    assert client_personal_state(empty, store, 2) == {}
    assert client_personal_state(empty, None, 3) == {}
    kept = _context({"partition-id": 0})
    records.store_personal_state(kept.state, {"w": torch.tensor([7.0])})
    assert torch.equal(client_personal_state(kept, store, 3)["w"], torch.tensor([7.0]))
