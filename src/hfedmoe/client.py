"""One client's round, independent of Flower: build model and data, train, choose the upload.

Every process rebuilds the model deterministically from the run configuration (pretrained
weights or a seeded random init), so the only tensors that travel are the trainable ones.

:class:`ClientResources` keeps what a process already built (the model, tokenized partitions)
for the next round or the next client on the same process (a Ray actor serves many). Reusing
the model is exact: every trainable tensor is overwritten from the global state at the start
of each round and the frozen ones never change (no optimizer touches them).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Mapping

import torch

from hfedmoe.config import RunConfig
from hfedmoe.costs import client_budget
from hfedmoe.data import client_train_set, load_corpus, tokenize
from hfedmoe.data.tokenize import TokenizedSet
from hfedmoe.model import load_adapter, load_tokenizer
from hfedmoe.model.adapter import MoEAdapter
from hfedmoe.model.state import read_state, set_trainable, write_state
from hfedmoe.strategies import method_for
from hfedmoe.training import (
    LocalTrainingResult,
    LocalTrainingSettings,
    skipped_round,
    train_locally,
)


@dataclass(frozen=True)
class ClientRound:
    budget_experts: int  # C_budget(c) this client resolved
    upload: dict[str, torch.Tensor]
    result: LocalTrainingResult


def round_seed(seed: int, server_round: int, client_id: int) -> int:
    """A stable per-(run, round, client) seed (independent of Python's hash randomisation)."""
    return zlib.crc32(f"{seed}/{server_round}/{client_id}".encode())


def build_model(config: RunConfig, num_labels: int) -> MoEAdapter:
    return load_adapter(config.model, num_labels=num_labels, seed=config.seed)


def client_data(config: RunConfig, partition_id: int) -> tuple[TokenizedSet, int]:
    """This client's tokenized training partition and the number of labels."""
    corpus = load_corpus(config.data)
    train_set = client_train_set(corpus, config.data, config.seed, partition_id)
    tokenizer = load_tokenizer(config.model)
    return tokenize(train_set, tokenizer, config.model.max_length), len(corpus.label_names)


def local_settings(config: RunConfig, seed: int, local_steps: int | None = None
                   ) -> LocalTrainingSettings:
    """The local-training settings of ``config`` (``local_steps`` overrides train.local-steps)."""
    return LocalTrainingSettings(
        local_steps=config.train.local_steps if local_steps is None else local_steps,
        batch_size=config.train.batch_size,
        lr=config.train.lr,
        weight_decay=config.train.weight_decay,
        aux_loss_coef=config.model.aux_loss_coef,
        seed=seed,
    )


class ClientResources:
    """Per-process reuse of the built model (one) and of tokenized partitions (a few)."""

    MAX_PARTITIONS = 64

    def __init__(self) -> None:
        self._model_key: str | None = None
        self._model: MoEAdapter | None = None
        self._data: dict[str, tuple[TokenizedSet, int]] = {}

    def data(self, config: RunConfig, partition_id: int) -> tuple[TokenizedSet, int]:
        key = json.dumps([config.data.__dict__, config.model.name, config.model.max_length,
                          config.seed, partition_id], sort_keys=True)
        if key not in self._data:
            if len(self._data) >= self.MAX_PARTITIONS:
                self._data.clear()
            self._data[key] = client_data(config, partition_id)
        return self._data[key]

    def model(self, config: RunConfig, num_labels: int) -> MoEAdapter:
        key = json.dumps([config.model.__dict__, config.seed, num_labels], sort_keys=True)
        if key != self._model_key:
            self._model, self._model_key = build_model(config, num_labels), key
        return self._model


def run_client_round(config: RunConfig, partition_id: int, server_round: int,
                     global_state: Mapping[str, torch.Tensor],
                     node_budget: str | int | None = None,
                     resources: ClientResources | None = None) -> ClientRound:
    """Load the global state, train locally under this client's budget, return the upload.

    ``node_budget``: the SuperNode's ``budget`` node-config value (deployment); it wins over
    the run config's ``budget.experts``.
    """
    resources = resources or ClientResources()
    data, num_labels = resources.data(config, partition_id)
    adapter = resources.model(config, num_labels)
    params = set_trainable(adapter, config.model.trainable_non_expert)
    if set(global_state) != set(params):
        raise ValueError("the global state does not cover exactly this model's trainable tensors")
    write_state(params, global_state)
    budget = client_budget(adapter, config, partition_id, node_budget)
    method = method_for(config)
    seed = round_seed(config.seed, server_round, partition_id)
    settings = local_settings(config, seed)
    if not method.participates(budget, adapter.geometry):
        g = adapter.geometry
        return ClientRound(budget, {}, skipped_round(len(data), g.num_layers, g.num_experts))
    result = train_locally(adapter, list(params.values()), data, settings,
                           method.selector(budget, adapter.geometry, seed))
    upload = method.upload(read_state(params), result)
    return ClientRound(budget_experts=budget, upload=upload, result=result)
