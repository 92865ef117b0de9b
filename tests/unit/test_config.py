"""Config: one place for defaults, typed parsing, one-line errors naming key and value."""

import tomllib
from pathlib import Path

import pytest

from hfedmoe.config import (
    ConfigError,
    _flatten,
    default_flat_config,
    load_config_file,
    parse_assignment,
    parse_run_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_app_config_mirrors_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table = pyproject["tool"]["flwr"]["app"]["config"]
    assert _flatten(table) == default_flat_config(), "run tools/sync_app_config.py"


def test_contract_keys_exist_with_these_names():
    flat = default_flat_config()
    for key in ("method", "num-server-rounds", "seed", "out"):
        assert key in flat


def test_defaults_parse_and_round_trip():
    config = parse_run_config()
    assert config.model.name == "minilm-moe"
    assert config.data.partition == "dirichlet" and config.data.num_clients == 8
    assert parse_run_config(config.to_flat()) == config


def test_later_layers_win_and_ints_become_floats():
    config = parse_run_config({"train.lr": 1}, {"train.lr": 2})
    assert config.train.lr == 2.0 and isinstance(config.train.lr, float)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"num-server-rounds": 0}, "'num-server-rounds' = 0"),
        ({"data.dirichlet-alpha": 0.0}, "'data.dirichlet-alpha' = 0.0"),
        ({"data.dirichlet-alpha": -1.0}, "expected a number > 0"),
        ({"method": "fedsgd"}, "one of 'hfedmoe', 'fedavg'"),
        ({"model.top-k": 9}, "'model.top-k' = 9"),
        ({"data.partition": "random"}, "'data.partition'"),
        ({"train.batch-size": "big"}, "expected an integer"),
        ({"data.source": "file"}, "'data.path'"),
        ({"simulation.runtime": "threads"}, "'simulation.runtime'"),
        ({"train.fraction-train": 1.5}, "'train.fraction-train' = 1.5"),
        ({"model.device": "tpu"}, "'model.device'"),
    ],
)
def test_bad_values_name_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        parse_run_config(override)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'num-server-rounds'"):
        parse_run_config({"num-server-round": 3})


def test_assignments_are_toml_literals_or_bare_words():
    assert parse_assignment("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_assignment("method=fedavg") == ("method", "fedavg")
    assert parse_assignment("model.name=tiny:mixtral") == ("model.name", "tiny:mixtral")
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("train.lr")


def test_config_files_with_tables(tmp_path):
    file = tmp_path / "exp.toml"
    file.write_text('seed = 3\n[model]\nname = "tiny:olmoe"\n')
    assert parse_run_config(load_config_file(file)).model.name == "tiny:olmoe"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


def test_experiment_files_in_conf_are_valid():
    for file in sorted((ROOT / "conf").glob("*.toml")):
        parse_run_config(load_config_file(file))
