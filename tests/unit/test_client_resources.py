"""What a client process builds is reused across messages, also when the ClientApp object
arrives as a fresh copy with each message (Flower's Ray backend pickles it per message),
and is rebuilt when the data changed."""

from __future__ import annotations

import cloudpickle
import pytest

from hfedmoe import client as client_module
from hfedmoe.config import parse_run_config
from hfedmoe.federation import records
from hfedmoe.federation.client_app import make_client_app
from hfedmoe.federation.grids import InProcessGrid
from hfedmoe.federation.loop import RoundPolicy
from hfedmoe.federation.server_app import run_server

TINY = {"model.name": "tiny:qwen2_moe", "model.max-length": 32, "data.num-clients": 2,
        "data.max-examples": 200, "train.local-steps": 1, "train.batch-size": 4,
        "num-server-rounds": 2, "simulation.runtime": "inprocess", "checkpoint.every": 0}


class CopiedPerMessage:
    """A ClientApp stand-in that, like Ray, runs a fresh unpickled copy for every message."""

    def __init__(self, app) -> None:
        self._blob = cloudpickle.dumps(app)

    def __call__(self, message, context):
        return cloudpickle.loads(self._blob)(message, context)


@pytest.fixture
def counted_builds(monkeypatch):
    client_module._resources_of_process.cache_clear()  # this test's process starts empty
    builds = {"model": 0, "corpus": 0}
    from hfedmoe.tasks.classification import ClassificationTask

    build_model, drop = client_module.build_model, ClassificationTask.usable_corpus

    def counting_model(*args, **kwargs):
        builds["model"] += 1
        return build_model(*args, **kwargs)

    def counting_drop(*args, **kwargs):
        builds["corpus"] += 1
        return drop(*args, **kwargs)

    monkeypatch.setattr(client_module, "build_model", counting_model)
    monkeypatch.setattr(ClassificationTask, "usable_corpus", counting_drop)
    yield builds
    client_module._resources_of_process.cache_clear()


def test_copied_client_app_reuses_the_process_model_and_corpus(tmp_path, counted_builds):
    config = parse_run_config({**TINY, "out": str(tmp_path / "run")})
    grid = InProcessGrid(CopiedPerMessage(make_client_app()), config.data.num_clients)
    summary = run_server(grid, config)
    assert summary["trained_rounds"] == 2
    # 2 rounds x 2 clients x (train + evaluate) = 8 messages, one build of each in the client
    # process (the corpus count also holds the server's own filtering, in its preflight)
    assert counted_builds == {"model": 1, "corpus": 2}


def test_changed_data_file_is_loaded_afresh(tmp_path, counted_builds):
    path = tmp_path / "data.csv"
    rows = [f"text number {i} about {'sport' if i % 2 else 'money'},{i % 2}" for i in range(40)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    config = parse_run_config({**TINY, "data.source": "file", "data.path": str(path),
                               "data.max-examples": 0})
    resources = client_module.process_resources()
    before = resources.data(config, 0)
    assert resources.data(config, 0) is before and counted_builds["corpus"] == 1
    path.write_text("text,label\n" + "\n".join(r.replace("text", "note") for r in rows) + "\n",
                    encoding="utf-8")
    after = resources.data(config, 0)
    assert counted_builds["corpus"] == 2
    assert not after.train.input_ids.equal(before.train.input_ids)


def test_a_new_client_does_not_recompute_every_partition(monkeypatch):
    """Many clients (#17): all N partitions are computed once per process; later clients'
    data come from them (the same data as computed afresh)."""
    config = parse_run_config(TINY, {"data.num-clients": 40, "data.partition": "iid"})
    calls = []
    original = client_module.partition_indices

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(client_module, "partition_indices", counted)
    resources = client_module.ClientResources()
    built = [resources.data(config, pid) for pid in (3, 17, 39)]
    assert len(calls) == 1
    for pid, data in zip((3, 17, 39), built):
        fresh = client_module.client_datasets(config, pid)
        assert data.train.input_ids.equal(fresh.train.input_ids)
    resources.data(parse_run_config(TINY, {"data.num-clients": 41, "data.partition": "iid"}), 0)
    assert len(calls) == 2  # another split: computed again


@pytest.mark.parametrize("source", ["wordnet", "quiz"])
def test_an_unchanged_source_is_not_read_again_and_a_touched_one_is(tmp_path, monkeypatch,
                                                                    source):
    """The raw corpus is cached on its files' signature (hfedmoe.data.sources): a second
    message of the same run reads nothing; a file rewritten in place is read again."""
    import shutil

    from hfedmoe.data import instruct

    folder = tmp_path / source
    if source == "wordnet":
        shutil.copytree("tests/fixtures/wordnet", folder)
        changed = folder / "data.verb"
    else:
        folder.mkdir()
        (folder / "index").write_text("/usr/share/games/bsdgames/quiz/capitals:country:capital\n")
        changed = folder / "capitals"
        changed.write_text("France:Paris\nSpain:Madrid\nItaly:Rome\nPeru:Lima\nChad:N'Djamena\n")
    loads = []
    loader = {"wordnet": "load_wordnet_instructions", "quiz": "load_quiz"}[source]
    original = getattr(instruct, loader)

    def counted(cfg):
        loads.append(1)
        return original(cfg)
    monkeypatch.setattr(instruct, loader, counted)
    config = parse_run_config({**TINY, "task": "causal-lm", "data.source": source,
                               "data.path": str(folder), "data.partition": "iid",
                               "data.test-fraction": 0.4})
    resources = client_module.ClientResources()
    key, _, first = resources.corpus(config)
    assert resources.corpus(config)[0] == key and len(loads) == 1
    text = changed.read_text()
    changed.write_text(text.replace("rain", "snow") if source == "wordnet"
                       else text.replace("Paris", "Lyon"))
    key_after, _, after = resources.corpus(config)
    assert len(loads) == 2 and key_after != key
    assert sorted(after.train.responses + after.test.responses) != \
        sorted(first.train.responses + first.test.responses)
