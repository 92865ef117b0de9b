"""Instruction pairs for causal-LM fine-tuning: (prompt, response) -> token ids and labels.

Format: the tokenizer's chat template when it has one (a user turn holding the prompt, the
generation prompt, then an assistant turn holding the response, closed the template's way,
e.g. ChatML's ``<|im_end|>``); otherwise :data:`PLAIN_FORMAT` followed by the response and the
tokenizer's end-of-sequence token (its separator token when it has no eos, as BERT-style
vocabularies).

Labels (what the loss sees): ``IGNORE_INDEX`` (-100, ignored by ``F.cross_entropy`` and by
transformers' causal-LM loss) on every prompt token and on padding; the response tokens and
the turn's closing tokens are learned, so the model learns to stop. The prompt part is the
longest common prefix of the prompt rendered alone (with the generation prompt) and the whole
conversation, so a template that renders the assistant turn differently from the generation
prompt still masks exactly the shared part.

Truncation at ``max_length``: the end of the response is cut; a pair whose prompt leaves no
room for a single response token is dropped, and the number dropped is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hfedmoe.data.corpora import DataError, TextDataset
from hfedmoe.data.tokenize import TokenizedSet

IGNORE_INDEX = -100
PLAIN_FORMAT = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True)
class InstructionPair:
    prompt: str
    response: str


# N tokenized conversations, right-padded to a common length T: input_ids, attention_mask and
# labels (N, T) int64 (labels: the token to learn at that position, or IGNORE_INDEX); dropped:
# pairs left out because the prompt alone filled max_length
CausalLMSet = TokenizedSet


def dataset_pairs(dataset: TextDataset) -> list[InstructionPair]:
    """The (prompt, response) pairs of an instruction dataset (hfedmoe.data.instruct)."""
    if len(dataset) and not dataset.responses:
        raise DataError("the dataset holds no responses: task 'causal-lm' needs instruction "
                        "pairs (hfedmoe.data.instruct)")
    return [InstructionPair(p, r) for p, r in zip(dataset.texts, dataset.responses)]


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids a model is given to answer ``prompt``: what :func:`pair_token_ids`
    masks, ending where the response starts (generation, hfedmoe.tasks.causal_lm)."""
    if getattr(tokenizer, "chat_template", None):
        return _ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True))
    return tokenizer(PLAIN_FORMAT.format(prompt=prompt), add_special_tokens=True)["input_ids"]


def end_token_id(tokenizer: Any) -> int | None:
    """The token that ends a response in :data:`PLAIN_FORMAT`: eos, else sep (BERT-style
    vocabularies such as the tiny models' have no eos), else None."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None \
        else tokenizer.sep_token_id


def pair_token_ids(tokenizer: Any, pair: InstructionPair) -> tuple[list[int], int]:
    """The conversation's token ids and how many of them belong to the prompt (masked)."""
    prompt = prompt_token_ids(tokenizer, pair.prompt)
    if getattr(tokenizer, "chat_template", None):
        user = {"role": "user", "content": pair.prompt}
        full = _ids(tokenizer.apply_chat_template(
            [user, {"role": "assistant", "content": pair.response}], tokenize=True))
    else:
        end = end_token_id(tokenizer)
        full = (prompt + tokenizer(pair.response, add_special_tokens=False)["input_ids"]
                + ([end] if end is not None else []))
    shared = 0
    for a, b in zip(prompt, full):
        if a != b:
            break
        shared += 1
    return full, shared


def tokenize_instructions(pairs: Sequence[InstructionPair], tokenizer: Any, max_length: int
                          ) -> CausalLMSet:
    """Token ids, padding mask and labels of ``pairs`` (module docstring); raises DataError
    when ``max_length`` < 2, the tokenizer has no pad token, or no pair fits."""
    if max_length < 2:
        raise DataError(f"max_length = {max_length} is invalid: a causal-LM example needs >= 2 "
                        "tokens")
    if tokenizer.pad_token_id is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no pad token; set one first")
    rows, dropped = [], 0
    for pair in pairs:
        ids, prompt_length = pair_token_ids(tokenizer, pair)
        if prompt_length >= min(len(ids), max_length):
            dropped += 1  # no response token fits (or the response is empty)
            continue
        ids = ids[:max_length]
        labels = [IGNORE_INDEX] * prompt_length + ids[prompt_length:]
        rows.append((ids, labels))
    if not rows:
        raise DataError(f"no instruction pair fits max_length = {max_length} with at least one "
                        f"response token ({dropped} dropped)")
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    for row, (ids, targets) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(targets)
    return TokenizedSet(input_ids, attention_mask, labels, dropped)


def _ids(rendered: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)."""
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return [int(i) for i in rendered]
