"""Task ``causal-lm``: instruction tuning of an MoE language model, prompt -> response.

Examples are (prompt, response) pairs (:mod:`hfedmoe.data.instruct`), rendered with the
tokenizer's chat template or the plain format, the prompt masked with -100
(:mod:`hfedmoe.data.instructions`). A pair whose prompt leaves no room for one response token
within ``model.max-length`` is dropped before partitioning (noted), so every example teaches
something and every process partitions the same pairs.

Loss (training and evaluation): next-token cross-entropy, logits at position t against the
token at t+1, over the response tokens only (labels != -100), mean per response token of the
batch (as transformers' causal-LM loss). Importance, usage and budgets see every real
(non-padding) token, prompt included: routing happens on all of them.

Evaluation on a tokenised split: ``loss`` = mean cross-entropy per response token (nats),
``perplexity`` = exp(loss), ``accuracy`` = share of response tokens whose greedy next-token
prediction is right. Generation (server side, each evaluated round): greedy answers to the
first ``generate.examples`` prompts of the global test split (a fixed sample: the split is
ordered by a hash of the pairs), at most ``generate.max-new-tokens`` tokens, cut at the end
token; ``exact_match`` = share of answers equal to the reference after lower-casing,
collapsing whitespace and stripping surrounding spaces and full stops; ``rouge_l`` = mean
ROUGE-L F1 (Google's ``rouge-score``, its default tokenizer: lower-cased ASCII alphanumeric
words, no stemming).

Final model: a stock transformers folder of the model's own family (the experts folded back
into its fused layout), which ``AutoModelForCausalLM`` loads without hfedmoe; after a LoRA run
also the base model and the adapter in peft's format (:meth:`CausalLMTask.export`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from hfedmoe.config import DataConfig, GenerateConfig, ModelConfig, RunConfig
from hfedmoe.data.corpora import Corpus, DataError, TextDataset
from hfedmoe.data.instruct import load_instruction_corpus
from hfedmoe.data.instructions import (
    IGNORE_INDEX,
    InstructionPair,
    dataset_pairs,
    end_token_id,
    first_learned,
    pair_token_ids,
    prompt_token_ids,
    tokenize_instructions,
)
from hfedmoe.data.tokenize import TokenizedSet, eval_batches
from hfedmoe.model import load_adapter
from hfedmoe.model.adapter import MoEAdapter
from hfedmoe.model.causal_lm import export_causal_lm, greedy_generate
from hfedmoe.model.peft_export import export_peft_adapter
from hfedmoe.model.state import trainable_parameters
from hfedmoe.tasks import Evaluation, GenerationReport

BASE_DIR = "base"  # <final-model>/base: a LoRA run's base model (stock transformers)
ADAPTER_DIR = "adapter"  # <final-model>/adapter: its LoRA adapter in peft's format


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T)
    (unshifted, -100 = not learned), per learned token."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def normalise_answer(text: str) -> str:
    """Exact-match normal form: lower case, whitespace collapsed, surrounding spaces and full
    stops stripped."""
    return " ".join(text.lower().split()).strip(" .")


class CausalLMTask:
    name = "causal-lm"

    def load_corpus(self, cfg: DataConfig) -> Corpus:
        return load_instruction_corpus(cfg)

    def usable_corpus(self, corpus: Corpus, tokenizer: Any, max_length: int) -> Corpus:
        """``corpus`` without the pairs that leave no response token within ``max_length``
        (a prompt of ``max_length`` tokens or more); each drop noted. DataError if a split
        would be left empty."""
        splits, notes = [], list(corpus.notes)
        for name, split in (("train", corpus.train), ("test", corpus.test)):
            keep = []
            for i, pair in enumerate(dataset_pairs(split)):
                ids, labels = pair_token_ids(tokenizer, pair)
                if first_learned(labels) < min(len(ids), max_length):
                    keep.append(i)
            if not keep:
                raise DataError(f"no {name} pair leaves room for a response token within "
                                f"model.max-length = {max_length}")
            if len(keep) < len(split):
                notes.append(f"dropped {len(split) - len(keep)} {name} pair(s) whose prompt "
                             f"fills model.max-length = {max_length} tokens")
                split = split.subset(keep)
            splits.append(split)
        return Corpus(splits[0], splits[1], corpus.label_names, notes=tuple(notes))

    def tokenize(self, dataset: TextDataset, tokenizer: Any, max_length: int) -> TokenizedSet:
        return tokenize_instructions(dataset_pairs(dataset), tokenizer, max_length)

    def build_adapter(self, model_cfg: ModelConfig, num_labels: int, seed: int) -> MoEAdapter:
        return load_adapter(model_cfg, num_labels=num_labels, seed=seed, head="causal-lm")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(logits, labels)

    @torch.no_grad()
    def evaluate(self, adapter: MoEAdapter, data: TokenizedSet, batch_size: int) -> Evaluation:
        """Loss per response token, perplexity and next-token accuracy (module docstring)."""
        model = adapter.model
        device = next(model.parameters()).device
        model.eval()
        loss_sum, correct, tokens = 0.0, 0, 0
        for batch in eval_batches(data, batch_size):
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            predicted = logits[:, :-1]  # (B, T-1, V)
            targets = batch["labels"][:, 1:].to(device)  # (B, T-1)
            learned = targets != IGNORE_INDEX
            loss_sum += float(F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]).float(),
                                              targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                              reduction="sum"))
            correct += int(((predicted.argmax(dim=-1) == targets) & learned).sum())
            tokens += int(learned.sum())
        loss = loss_sum / max(tokens, 1)
        return Evaluation(correct / max(tokens, 1), loss, len(data),
                          {"perplexity": math.exp(min(loss, 700.0))})

    def generation_report(self, adapter: MoEAdapter, tokenizer: Any, test: TextDataset,
                          cfg: GenerateConfig) -> GenerationReport | None:
        """Greedy answers to the first ``cfg.examples`` test prompts, scored (module
        docstring); None when ``cfg.examples`` is 0."""
        pairs: list[InstructionPair] = dataset_pairs(test)[: cfg.examples]
        if not pairs:
            return None
        stops = {t for t in (tokenizer.eos_token_id, end_token_id(tokenizer)) if t is not None}
        answers = greedy_generate(adapter.model,
                                  [prompt_token_ids(tokenizer, p.prompt, p.context)
                                   for p in pairs],
                                  cfg.max_new_tokens, stops, tokenizer.pad_token_id)
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        samples, exact, rouge = [], 0, 0.0
        for pair, ids in zip(pairs, answers):
            generation = tokenizer.decode(ids, skip_special_tokens=True).strip()
            exact += normalise_answer(generation) == normalise_answer(pair.response)
            rouge += scorer.score(pair.response, generation)["rougeL"].fmeasure
            samples.append({"prompt": pair.prompt, "reference": pair.response,
                            "generation": generation})
        return GenerationReport({"exact_match": exact / len(pairs),
                                 "rouge_l": rouge / len(pairs)}, samples)

    def export(self, adapter: MoEAdapter, tokenizer: Any, folder: Path, config: RunConfig,
               labels: Sequence[str]) -> Path:
        """A stock transformers folder: ``AutoModelForCausalLM.from_pretrained(folder)`` and
        ``AutoTokenizer.from_pretrained(folder)`` load it (``hfedmoe generate`` does); the
        LoRA factors, if any, merged into the expert weights. A LoRA run also writes
        ``folder/base`` (the run's base model, rebuilt from the config: the seeded model every
        process started from) and ``folder/adapter`` (peft's format,
        hfedmoe.model.peft_export) that ``PeftModel.from_pretrained`` loads on it."""
        if config.train.adapter == "lora":
            base = self.build_adapter(config.model, 0, config.seed)
            # quantized training: the base the factors learned on (dequantized), for exactness
            base.quantize_experts(config.model.quantization)
            base.merge_lora()  # (no factors: only dequantizes)
            export_causal_lm(base.model, base.banks, tokenizer, folder / BASE_DIR)
            del base
            trained = trainable_parameters(adapter, config.model.trainable_non_expert).values()
            export_peft_adapter(adapter.model.hf_model, adapter.banks, trained,
                                config.lora.settings(), folder / BASE_DIR, folder / ADAPTER_DIR)
        adapter.merge_lora()
        return export_causal_lm(adapter.model, adapter.banks, tokenizer, folder)
