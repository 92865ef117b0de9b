"""Task ``classification``: a text -> one of C labels (BBC News topics, WordNet lexnames, ...).

Model: the MoE backbone, masked mean pooling over real tokens, a linear head
(:class:`hfedmoe.model.classifier.MoEClassifier`). Loss: cross-entropy over the C classes,
mean over the batch. Evaluation: accuracy and mean cross-entropy per example. Final model:
hfedmoe's classifier format (:mod:`hfedmoe.model.export`), which ``hfedmoe predict`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from hfedmoe.config import DataConfig, GenerateConfig, ModelConfig, RunConfig
from hfedmoe.data.corpora import Corpus, TextDataset, load_corpus
from hfedmoe.data.tokenize import TokenizedSet, drop_untokenizable, eval_batches, tokenize
from hfedmoe.model import load_adapter
from hfedmoe.model.adapter import MoEAdapter
from hfedmoe.model.export import export_classifier
from hfedmoe.tasks import Evaluation, GenerationReport


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, C) against class ids ``labels`` (B,)."""
    return F.cross_entropy(logits, labels)


class ClassificationTask:
    name = "classification"

    def load_corpus(self, cfg: DataConfig) -> Corpus:
        return load_corpus(cfg)

    def usable_corpus(self, corpus: Corpus, tokenizer: Any, max_length: int) -> Corpus:
        return drop_untokenizable(corpus, tokenizer)

    def tokenize(self, dataset: TextDataset, tokenizer: Any, max_length: int) -> TokenizedSet:
        return tokenize(dataset, tokenizer, max_length)

    def build_adapter(self, model_cfg: ModelConfig, num_labels: int, seed: int) -> MoEAdapter:
        return load_adapter(model_cfg, num_labels=num_labels, seed=seed)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits, labels)

    @torch.no_grad()
    def evaluate(self, adapter: MoEAdapter, data: TokenizedSet, batch_size: int) -> Evaluation:
        """Accuracy and mean cross-entropy per example of the model on ``data``."""
        model = adapter.model
        device = next(model.parameters()).device
        model.eval()
        correct, loss_sum = 0, 0.0
        for batch in eval_batches(data, batch_size):
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            labels = batch["labels"].to(device)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
        return Evaluation(correct / len(data), loss_sum / len(data), len(data))

    def generation_report(self, adapter: MoEAdapter, tokenizer: Any, test: TextDataset,
                          cfg: GenerateConfig) -> GenerationReport | None:
        return None

    def export(self, adapter: MoEAdapter, tokenizer: Any, folder: Path, config: RunConfig,
               labels: Sequence[str]) -> Path:
        """hfedmoe's classifier format (hfedmoe.model.export; ``hfedmoe predict`` loads it),
        any LoRA factors merged into the expert weights (no peft adapter: peft has no class for
        hfedmoe's pooled classifier)."""
        adapter.merge_lora()
        return export_classifier(adapter, tokenizer, folder, config.model, config.seed, labels)
