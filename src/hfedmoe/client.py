"""One client's round, independent of Flower: build model and data, train, choose the upload.

Every process rebuilds the model deterministically from the run configuration (pretrained
weights or a seeded random init), so the only tensors that travel are the trainable ones.
"""

from __future__ import annotations

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
from hfedmoe.training import LocalTrainingResult, LocalTrainingSettings, train_locally


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


def run_client_round(config: RunConfig, partition_id: int, server_round: int,
                     global_state: Mapping[str, torch.Tensor],
                     node_budget: str | int | None = None) -> ClientRound:
    """Load the global state, train locally under this client's budget, return the upload.

    ``node_budget``: the SuperNode's ``budget`` node-config value (deployment); it wins over
    the run config's ``budget.experts``.
    """
    data, num_labels = client_data(config, partition_id)
    adapter = build_model(config, num_labels)
    params = set_trainable(adapter, config.model.trainable_non_expert)
    write_state(params, global_state)
    budget = client_budget(adapter, config, partition_id, node_budget)
    method = method_for(config)
    settings = LocalTrainingSettings(
        local_steps=config.train.local_steps,
        batch_size=config.train.batch_size,
        lr=config.train.lr,
        weight_decay=config.train.weight_decay,
        aux_loss_coef=config.model.aux_loss_coef,
        seed=round_seed(config.seed, server_round, partition_id),
    )
    result = train_locally(adapter, list(params.values()), data, settings,
                           method.selector(budget, adapter.geometry))
    upload = method.upload(read_state(params), result)
    return ClientRound(budget_experts=budget, upload=upload, result=result)
