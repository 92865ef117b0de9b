"""One client's round, independent of Flower: build model and data, train, choose the upload.

Every process rebuilds the model deterministically from the run configuration (pretrained
weights or a seeded random init), so the only tensors that travel are the trainable ones.

:class:`ClientResources` keeps what a process already built (the model, the filtered corpus,
tokenized partitions) for the next round or the next client on the same process (a Ray actor
serves many). Reusing the model is exact: every trainable tensor is overwritten from the global
state at the start of each round and the frozen ones never change (no optimizer touches them).
:func:`process_resources` is the one instance of a process: Flower's Ray backend pickles the
ClientApp object with every message (``actor.run.remote(app_fn, message, ...)``), so whatever
the app object itself held would arrive empty each time and every message would rebuild the
model and re-tokenize the corpus (measured: about half of a default round).

A method may keep a client's personal state across rounds (flex: its personal experts and
routers): the caller passes the stored tensors in, they are loaded over the global state, and
the round returns the new values to store; they are never uploaded. :func:`evaluate_client`
is the personalised evaluation: the same loading, then accuracy on the client's own test split.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from hfedmoe.calibration import Calibration
from hfedmoe.config import RunConfig
from hfedmoe.costs import client_budget
from hfedmoe.data import Corpus, client_split
from hfedmoe.data.packing import pack_examples
from hfedmoe.data.partition import partition_indices
from hfedmoe.data.sources import source_signature
from hfedmoe.data.tokenize import TokenizedSet, batches
from hfedmoe.fingerprint import corpus_fingerprint
from hfedmoe.heap import return_freed_memory
from hfedmoe.model import load_tokenizer
from hfedmoe.model.adapter import MoEAdapter
from hfedmoe.model.state import read_state, set_trainable, write_state
from hfedmoe.strategies import (
    ClientPlan,
    Method,
    client_routing_loss,
    method_for,
    plan_round,
)
from hfedmoe.measurement import AllocatorPeak
from hfedmoe.split import SplitModel
from hfedmoe.strategies.ho_sfl import (active_client_experts, client_answer, part_budget,
                                       split_method)
from hfedmoe.tasks import task_for
from hfedmoe.training import (
    LocalTrainingResult,
    LocalTrainingSettings,
    routing_counts,
    skipped_round,
    train_locally,
)


@dataclass(frozen=True)
class ClientRound:
    budget_experts: int  # C_budget(c) this client resolved
    upload: dict[str, torch.Tensor]
    result: LocalTrainingResult
    personal: dict[str, torch.Tensor] = field(default_factory=dict)  # kept, never uploaded


@dataclass(frozen=True)
class ClientData:
    train: TokenizedSet
    test: TokenizedSet | None  # the client's own test split; None when it has none
    num_labels: int


@dataclass(frozen=True)
class ClientEvaluation:
    accuracy: float
    loss: float  # mean cross-entropy (causal-lm: per response token)
    num_examples: int  # size of the client's test split (0: nothing evaluated)
    metrics: dict[str, float] = field(default_factory=dict)  # task extras (perplexity)


def round_seed(seed: int, server_round: int, client_id: int) -> int:
    """A stable per-(run, round, client) seed (independent of Python's hash randomisation)."""
    return zlib.crc32(f"{seed}/{server_round}/{client_id}".encode())


def build_model(config: RunConfig, num_labels: int) -> MoEAdapter:
    """The run's model with its task's head (``num_labels``: classes; unused by causal-lm),
    and each expert's LoRA factors with ``train.adapter = "lora"`` (hfedmoe.model.lora;
    raises UnsupportedModelError for a family whose experts take none; with ``lora.targets =
    "experts+attention"`` the attention projections' factors too), the frozen expert
    weights quantized with ``model.quantization`` (hfedmoe.model.quantize)."""
    adapter = task_for(config.task).build_adapter(config.model, num_labels, config.seed)
    if config.train.adapter == "lora":
        adapter.attach_lora(config.lora.settings(), config.seed, attention=config.lora.attention)
        adapter.quantize_experts(config.model.quantization)
    return adapter


def load_usable_corpus(config: RunConfig, tokenizer) -> Corpus:
    """The corpus every process of a run partitions: the task's corpus of ``data.source``
    without the examples it cannot learn from (hfedmoe.tasks)."""
    task = task_for(config.task)
    return task.usable_corpus(task.load_corpus(config.data), tokenizer, config.model.max_length)


def client_datasets(config: RunConfig, partition_id: int, tokenizer=None,
                    corpus: Corpus | None = None,
                    partitions: Sequence[Sequence[int]] | None = None) -> ClientData:
    """This client's tokenized training and test splits (hfedmoe.data.client_split);
    ``tokenizer``, ``corpus`` (the run's filtered corpus) and ``partitions`` (every client's
    indices, hfedmoe.data.partition_indices) are computed when not given."""
    task = task_for(config.task)
    tokenizer = tokenizer or load_tokenizer(config.model)
    corpus = corpus or load_usable_corpus(config, tokenizer)
    train_set, test_set = client_split(corpus, config.data, config.seed, partition_id,
                                       partitions)
    length = config.model.max_length
    train = task.tokenize(train_set, tokenizer, length)
    if config.train.packing:
        train = pack_examples(train, length, tokenizer.pad_token_id)
    return ClientData(train,
                      task.tokenize(test_set, tokenizer, length) if len(test_set) else None,
                      len(corpus.label_names))


def round_lr(config: RunConfig, server_round: int) -> float:
    """The clients' AdamW learning rate in ``server_round`` (1-based) of R =
    ``num-server-rounds``: ``train.lr`` throughout (``train.lr-schedule = "constant"``), or
    annealed over the rounds (``"cosine"``, as FlowerTune's LLM baselines do, Loshchilov &
    Hutter's SGDR without restarts):

        lr_r = lr_min + (lr - lr_min) * (1 + cos(pi * (r - 1) / R)) / 2

    so round 1 trains at ``train.lr`` and round R at just above ``train.lr-min``. Late rounds'
    small steps keep non-IID clients from drifting apart once the global model is good
    (docs/hfedmoe.md, "Default run"). A function of the round and R alone, held nowhere: a
    run resumed with the same R, and every runtime, give the same lr; a run resumed with a
    larger R follows the new R's schedule from the resumed round on (a jump up under
    ``"cosine"``, as a transformers Trainer resumed with more steps). Rounds past R (none in a
    run) keep round R's. Split-learning methods
    (ho-sfl, sfl, zo-sfl) keep one optimizer per side across rounds on the server and do not
    follow the schedule: their lr stays ``train.lr`` / ``ho-sfl.client-lr``."""
    train = config.train
    if train.lr_schedule == "constant":
        return train.lr
    progress = (min(server_round, config.num_server_rounds) - 1) / config.num_server_rounds
    return train.lr_min + (train.lr - train.lr_min) * (1 + math.cos(math.pi * progress)) / 2


def local_settings(config: RunConfig, seed: int, local_steps: int | None = None,
                   server_round: int = 1) -> LocalTrainingSettings:
    """The local-training settings of ``config`` in ``server_round`` (``local_steps``
    overrides train.local-steps; the lr follows train.lr-schedule, :func:`round_lr`)."""
    return LocalTrainingSettings(
        local_steps=config.train.local_steps if local_steps is None else local_steps,
        batch_size=config.train.batch_size,
        lr=round_lr(config, server_round),
        weight_decay=config.train.weight_decay,
        aux_loss_coef=config.model.aux_loss_coef,
        seed=seed,
        budget_mode=config.budget.mode,
        optimizer_state=config.budget.optimizer_state,
    )


class ClientResources:
    """Per-process reuse of the built model (one), the run's tokenizer and filtered corpus
    (one) and tokenized partitions (a few)."""

    MAX_PARTITIONS = 64

    def __init__(self) -> None:
        self._model_key: str | None = None
        self._model: MoEAdapter | None = None
        self._corpus_key: str | None = None
        self._corpus: tuple[object, Corpus] | None = None  # (tokenizer, filtered corpus)
        # (source signature, raw corpus, its fingerprint): hfedmoe.data.sources
        self._raw: tuple[str, Corpus, str] | None = None
        self._data: dict[str, ClientData] = {}
        self._partitions: tuple[str, list[list[int]]] | None = None  # (key, every client's)

    def corpus(self, config: RunConfig) -> tuple[str, object, Corpus]:
        """The run's corpus key, tokenizer and filtered corpus
        (hfedmoe.data.load_tokenizable_corpus). The key holds the raw corpus's content
        fingerprint, so a data file changed in place between two runs of one process is
        loaded afresh. The raw corpus is read again only when its files' signature changed
        (hfedmoe.data.sources: sizes and modification times; reading WordNet costs ~2 s,
        its instruction pairs ~5 s) or cannot be taken (BBC News, ~0.1 s; a Hugging Face
        dataset)."""
        task = task_for(config.task)
        signature = source_signature(config.task, config.data)
        if signature is not None and self._raw is not None and self._raw[0] == signature:
            raw, fingerprint = self._raw[1], self._raw[2]
        else:
            raw = task.load_corpus(config.data)
            fingerprint = corpus_fingerprint(raw)
            self._raw = (signature, raw, fingerprint) if signature is not None else None
        key = json.dumps([fingerprint, config.model.name, config.task,
                          config.model.max_length])
        if key != self._corpus_key:
            tokenizer = load_tokenizer(config.model)
            self._corpus = (tokenizer, task.usable_corpus(raw, tokenizer,
                                                          config.model.max_length))
            self._corpus_key = key
        return (key, *self._corpus)

    def data(self, config: RunConfig, partition_id: int) -> ClientData:
        corpus_key, tokenizer, corpus = self.corpus(config)
        key = json.dumps([corpus_key, config.data.__dict__, config.model.max_length,
                          config.seed, partition_id], sort_keys=True)
        if key not in self._data:
            if len(self._data) >= self.MAX_PARTITIONS:
                self._data.clear()
            self._data[key] = client_datasets(config, partition_id, tokenizer, corpus,
                                              self.partitions(config, corpus_key, corpus))
        return self._data[key]

    def partitions(self, config: RunConfig, corpus_key: str, corpus: Corpus
                   ) -> list[list[int]]:
        """Every client's indices into ``corpus.train`` (hfedmoe.data.partition_indices),
        computed once per corpus and data configuration: a process that serves many clients
        (a Ray actor, the in-process runtime) then builds a new client's data in time that
        does not grow with data.num-clients."""
        key = json.dumps([corpus_key, config.data.__dict__, config.seed], sort_keys=True)
        if self._partitions is None or self._partitions[0] != key:
            self._partitions = (key, partition_indices(corpus.train.labels, config.data,
                                                       config.seed, corpus.label_names))
        return self._partitions[1]

    def model(self, config: RunConfig, num_labels: int) -> MoEAdapter:
        key = json.dumps([config.model.__dict__, config.seed, num_labels, config.task,
                          config.train.adapter, config.lora.__dict__], sort_keys=True)
        if key != self._model_key:
            self._model, self._model_key = build_model(config, num_labels), key
        return self._model


def process_resources() -> ClientResources:
    """This process's :class:`ClientResources` (a new one after a fork): what a Ray actor or a
    SuperNode process built for one message serves the next (see the module docstring)."""
    return _resources_of_process(os.getpid())


@functools.lru_cache(maxsize=1)
def _resources_of_process(pid: int) -> ClientResources:
    return ClientResources()


def run_client_round(config: RunConfig, partition_id: int, server_round: int,
                     global_state: Mapping[str, torch.Tensor],
                     node_budget: str | int | None = None,
                     resources: ClientResources | None = None,
                     personal: Mapping[str, torch.Tensor] | None = None,
                     calibration: Calibration | None = None,
                     guidance: Mapping[str, torch.Tensor] | None = None) -> ClientRound:
    """Load the global state (then ``personal``, the client's stored personal state), train
    locally under this client's budget, return the upload and the personal state to keep.

    ``node_budget``: the SuperNode's ``budget`` node-config value (deployment); it wins over
    the run config's ``budget.experts``. ``calibration``: the run's budget calibration (sent
    by the server); device profiles then resolve through it. ``guidance``: the method's
    extra tensors from the server (hfedmoe.strategies.GuidedMethod; FedAlign-MoE's routing
    target), turned into the method's routing loss term.
    """
    resources = resources or ClientResources()
    data = resources.data(config, partition_id)
    adapter = resources.model(config, data.num_labels)
    params = _load(adapter, config, global_state, personal or {})
    budget = client_budget(adapter, config, partition_id, node_budget, calibration)
    method = method_for(config)
    seed = round_seed(config.seed, server_round, partition_id)
    settings = local_settings(config, seed, server_round=server_round)
    if not method.participates(budget, adapter.geometry):
        g = adapter.geometry
        return ClientRound(budget, {}, skipped_round(data.train.num_examples, g.num_layers,
                                                     g.num_experts), dict(personal or {}))
    plan = _plan(method, config, adapter, data.train, budget, seed, personal or {})
    result = train_locally(adapter, list(params.values()), data.train, settings, plan.selector,
                           task_for(config.task).loss,
                           client_routing_loss(method, guidance or {}, adapter.geometry))
    return_freed_memory()  # the round's optimizer state and activations (hfedmoe.heap)
    trained = read_state(params)
    kept = plan.personal_keys(trained)
    upload = {k: v for k, v in method.upload(trained, result).items() if k not in kept}
    return ClientRound(budget, upload, result, {k: trained[k] for k in sorted(kept)})


def evaluate_client(config: RunConfig, partition_id: int, global_state: Mapping[str, torch.Tensor],
                    personal: Mapping[str, torch.Tensor] | None = None,
                    resources: ClientResources | None = None) -> ClientEvaluation:
    """Accuracy of the global state, with the client's personal state loaded over it, on the
    client's own test split (personalised evaluation; nothing is trained)."""
    resources = resources or ClientResources()
    data = resources.data(config, partition_id)
    if data.test is None:
        return ClientEvaluation(0.0, 0.0, 0)
    adapter = resources.model(config, data.num_labels)
    _load(adapter, config, global_state, personal or {})
    result = task_for(config.task).evaluate(adapter, data.test, config.train.eval_batch_size)
    return ClientEvaluation(result.accuracy, result.loss, len(data.test), dict(result.metrics))


def _load(adapter: MoEAdapter, config: RunConfig, global_state: Mapping[str, torch.Tensor],
          personal: Mapping[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    params = set_trainable(adapter, config.model.trainable_non_expert)
    if set(global_state) != set(params):
        raise ValueError("the global state does not cover exactly this model's trainable tensors")
    write_state(params, global_state)
    write_state(params, personal)
    return params


def _plan(method: Method, config: RunConfig, adapter: MoEAdapter, train: TokenizedSet,
          budget: int, seed: int, personal: Mapping[str, torch.Tensor]) -> ClientPlan:
    def probe() -> torch.Tensor:  # (L, S) routing counts of the loaded model on ``train``
        return routing_counts(adapter, train, config.train.eval_batch_size)

    return plan_round(method, budget, adapter.geometry, seed, probe, personal)


# --- split learning (ho-sfl, sfl, zo-sfl; hfedmoe.strategies.ho_sfl) ------------------------


@dataclass(frozen=True)
class SplitAnswer:
    outputs: dict  # hfedmoe.strategies.ho_sfl.client_answer's
    attention_mask: torch.Tensor  # (B, T) of the round's batch
    labels: torch.Tensor  # (B,) or (B, T)
    peak_memory_bytes: int  # the client part's weights + what the exchange allocated
    seconds: float  # compute of this exchange
    num_examples: int  # |D_c|, the client's training examples (the batch is drawn from them)


def run_split_exchange(config: RunConfig, partition_id: int, server_round: int, phase: str,
                       client_part: Mapping[str, torch.Tensor], seeds: Sequence[int] = (),
                       cut_gradient: torch.Tensor | None = None,
                       resources: ClientResources | None = None) -> SplitAnswer:
    """One split-learning exchange of this client in ``server_round``: theta_c
    (``client_part``) loaded into the client part, the round's ONE mini-batch (drawn from the
    client's round seed, so both exchanges of a round see the same batch), and the phase's
    answer. Raises ValueError if ``client_part`` is not exactly theta_c's keys."""
    resources = resources or ClientResources()
    data = resources.data(config, partition_id)
    adapter = resources.model(config, data.num_labels)
    params = set_trainable(adapter, config.model.trainable_non_expert)
    method = split_method(config)
    split = SplitModel(adapter, method.split_layer, params)
    if set(client_part) != set(split.sent_keys):
        raise ValueError("the client part sent does not match this model's theta_c")
    write_state({k: params[k] for k in split.sent_keys}, client_part)
    generator = torch.Generator().manual_seed(round_seed(config.seed, server_round,
                                                         partition_id))
    batch = next(batches(data.train, config.train.batch_size, generator))
    device = next(adapter.model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    start = time.perf_counter()
    with AllocatorPeak(device, split.client_weight_bytes()) as meter:
        active = None
        if phase == "zo" and method.active_experts:  # HFedMoE's selection in the client part
            geometry = adapter.geometry
            budget = part_budget(client_budget(adapter, config, partition_id),
                                 geometry.total_experts,
                                 split.client_moe_layers * geometry.num_experts)
            active = active_client_experts(split, batch, budget, config.hfedmoe.lambda_,
                                           config.hfedmoe.beta)
        outputs = client_answer(method, split, phase, batch, seeds, cut_gradient, active)
    return SplitAnswer(outputs, batch["attention_mask"].cpu(), batch["labels"].cpu(),
                       meter.peak_bytes, time.perf_counter() - start, data.train.num_examples)
