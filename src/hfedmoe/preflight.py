"""Everything a run needs, built and checked before anything on disk is touched.

:func:`prepare_run` loads the data, the tokenizer and the model, and checks what can be known
before round 1 - the model's input limits (positions, vocabulary) against ``model.max-length``
and the tokenizer, the partitions, every configured client budget, and that the method can
train at least one client - raising a one-line ConfigError, DataError,
ModelNotFoundError or UnsupportedModelError. Only then may a run write to its output
directory (``hfedmoe.run_dir``, ``hfedmoe.federation.server_app``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from hfedmoe.calibration import Calibration, CalibrationError, load_calibration, training_setup
from hfedmoe.client import build_model, load_usable_corpus
from hfedmoe.config import SPLIT_METHODS, ConfigError, RunConfig
from hfedmoe.costs import client_budget
from hfedmoe.data import Corpus, client_split_sizes
from hfedmoe.data.tokenize import TokenizedSet
from hfedmoe.fingerprint import input_fingerprints
from hfedmoe.model import MoEAdapter, load_tokenizer
from hfedmoe.model.loading import check_model_inputs, check_model_name, check_tokenizer
from hfedmoe.strategies import method_for
from hfedmoe.tasks import task_for


@dataclass(frozen=True, eq=False)
class PreparedRun:
    """What the server builds once per run (see :func:`prepare_run`)."""

    corpus: Corpus
    test_set: TokenizedSet  # the global test split, tokenized
    adapter: MoEAdapter  # the global model, initial weights
    client_sizes: list[int]  # training examples per client: the bound of its num-examples
    budgets: list[int]  # C_budget per client from the run config
    inputs: dict[str, str]  # hfedmoe.fingerprint.input_fingerprints (+ "calibration")
    calibration: Calibration | None = None  # budget.calibration, checked against the model
    tokenizer: Any = None  # the model's tokenizer (causal-lm: generation, the final model)


def prepare_run(config: RunConfig) -> PreparedRun:
    """Load and check everything (module docstring); writes nothing."""
    check_model_name(config.model)
    tokenizer = load_tokenizer(config.model)
    corpus = load_usable_corpus(config, tokenizer)
    adapter = build_model(config, num_labels=len(corpus.label_names))
    check_tokenizer(tokenizer, config.model.name)
    check_model_inputs(adapter, tokenizer, config.model.max_length, config.model.name)
    test_set = task_for(config.task).tokenize(corpus.test, tokenizer, config.model.max_length)
    sizes = [train for train, _ in client_split_sizes(corpus.train.labels, config.data,
                                                      config.seed, corpus.label_names)]
    inputs = input_fingerprints(corpus, config.model)
    calibration = _calibration(config, adapter, inputs["model"])
    if calibration is not None:
        inputs["calibration"] = hashlib.sha256(calibration.to_json().encode()).hexdigest()
    budgets = [_budget(config, adapter, client_id, calibration)
               for client_id in range(config.data.num_clients)]
    if config.method in SPLIT_METHODS:
        check_split(config, adapter)
    else:
        check_someone_trains(config, adapter, budgets)
    return PreparedRun(corpus, test_set, adapter, sizes, budgets, inputs, calibration, tokenizer)


def _calibration(config: RunConfig, adapter: MoEAdapter, model_fingerprint: str
                 ) -> Calibration | None:
    """``budget.calibration`` read and checked against the run (ConfigError, one line)."""
    if not config.budget.calibration:
        return None
    key = "config key 'budget.calibration'"
    try:
        calibration = load_calibration(config.budget.calibration)
    except CalibrationError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    try:
        calibration.check_fits(model_fingerprint, config.train.batch_size,
                               config.model.max_length, config.budget.mode,
                               adapter.geometry.total_experts, training_setup(config))
    except CalibrationError as exc:
        raise ConfigError(f"{key}: {config.budget.calibration}: {exc}") from None
    return calibration


def _budget(config: RunConfig, adapter: MoEAdapter, client_id: int,
            calibration: Calibration | None) -> int:
    try:
        return client_budget(adapter, config, client_id, calibration=calibration)
    except ValueError as exc:
        raise ConfigError(f"config key 'budget.experts' = {config.budget.experts!r}: "
                          f"client {client_id}: {exc}") from None


def check_split(config: RunConfig, adapter: MoEAdapter) -> None:
    """Raise ConfigError when ``ho-sfl.split-layer`` does not cut this model so that the
    client part has something to learn (hfedmoe.split.SplitModel)."""
    from hfedmoe.model.state import trainable_parameters
    from hfedmoe.split import SplitModel

    try:
        SplitModel(adapter, config.ho_sfl.split_layer,
                   trainable_parameters(adapter, config.model.trainable_non_expert))
    except ValueError as exc:
        raise ConfigError(f"config key 'ho-sfl.split-layer' = {config.ho_sfl.split_layer}: "
                          f"{exc}") from None


def check_someone_trains(config: RunConfig, adapter: MoEAdapter, budgets: list[int]) -> None:
    """Raise ConfigError when the method lets no client train under the configured budgets
    (e.g. ``fedavg-drop`` with every budget below all experts): such a run cannot learn."""
    method = method_for(config)
    if any(method.participates(budget, adapter.geometry) for budget in budgets):
        return
    total = adapter.geometry.total_experts
    raise ConfigError(
        f"method '{config.method}' lets no client train under budget.experts = "
        f"{config.budget.experts!r} (client budgets {sorted(set(budgets))} of {total} experts); "
        f"give some client a larger budget (e.g. budget.experts = '25%,all') or choose "
        f"another method")
