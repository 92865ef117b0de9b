"""Tasks: what a run learns (config key ``task``). One module per task.

A task says how examples are loaded, filtered and tokenised, which model head the MoE backbone
gets, what the training loss is and what evaluation measures (and, for language models, what
generation scores). The training loop, the client and the server ask the task; none of them
branches on its name.

* ``classification`` (:mod:`hfedmoe.tasks.classification`): text -> label; accuracy.
* ``causal-lm`` (:mod:`hfedmoe.tasks.causal_lm`): instruction tuning, prompt -> response; loss
  on the response tokens, perplexity, next-token accuracy, exact match and ROUGE-L of greedy
  answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from hfedmoe.config import DataConfig, GenerateConfig, ModelConfig, RunConfig
from hfedmoe.data.corpora import Corpus, TextDataset
from hfedmoe.data.tokenize import TokenizedSet
from hfedmoe.model.adapter import MoEAdapter


@dataclass(frozen=True)
class Evaluation:
    """A model's quality on one dataset."""

    accuracy: float  # classification: share of examples right; causal-lm: of response tokens
    loss: float  # mean cross-entropy (per example; causal-lm: per response token), nats
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)  # task extras, e.g. perplexity


@dataclass(frozen=True)
class GenerationReport:
    """Greedy answers to held-out prompts (causal-lm), scored against the references."""

    metrics: dict[str, float]  # e.g. exact_match, rouge_l (means over the prompts, in [0, 1])
    samples: list[dict[str, str]]  # {"prompt", "reference", "generation"} for each prompt


class Task(Protocol):
    name: str

    def load_corpus(self, cfg: DataConfig) -> Corpus:
        """The raw corpus of ``data.source`` (split, not yet filtered)."""
        ...

    def usable_corpus(self, corpus: Corpus, tokenizer: Any, max_length: int) -> Corpus:
        """``corpus`` without the examples the model could learn nothing from (noted)."""
        ...

    def tokenize(self, dataset: TextDataset, tokenizer: Any, max_length: int) -> TokenizedSet:
        ...

    def build_adapter(self, model_cfg: ModelConfig, num_labels: int, seed: int) -> MoEAdapter:
        """The MoE model with this task's head (hfedmoe.model.load_adapter)."""
        ...

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean training loss of one batch (a scalar with grad)."""
        ...

    def evaluate(self, adapter: MoEAdapter, data: TokenizedSet, batch_size: int) -> Evaluation:
        ...

    def generation_report(self, adapter: MoEAdapter, tokenizer: Any, test: TextDataset,
                          cfg: GenerateConfig) -> GenerationReport | None:
        """Greedy answers scored on a fixed sample of ``test``; None when the task has none."""
        ...

    def export(self, adapter: MoEAdapter, tokenizer: Any, folder: Path, config: RunConfig,
               labels: Sequence[str]) -> Path:
        """Write the model as users load it (README, "The final model"), any LoRA factors
        merged into the weights (the adapter may go beside it); returns ``folder``."""
        ...


def task_for(name: str) -> Task:
    """The task of config key ``task``."""
    from hfedmoe.tasks.causal_lm import CausalLMTask
    from hfedmoe.tasks.classification import ClassificationTask

    tasks: dict[str, Task] = {"classification": ClassificationTask(),
                              "causal-lm": CausalLMTask()}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(tasks)}")
    return tasks[name]
