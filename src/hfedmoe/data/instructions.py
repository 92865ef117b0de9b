"""Instruction pairs for causal-LM fine-tuning: (prompt, response) -> token ids and labels.

Format: the tokenizer's chat template when it has one (a user turn holding the prompt, the
generation prompt, then an assistant turn holding the response, closed the template's way,
e.g. ChatML's ``<|im_end|>``); otherwise :data:`PLAIN_FORMAT` followed by the response and the
tokenizer's end-of-sequence token (its separator token when it has no eos, as BERT-style
vocabularies).

Multi-turn chats: a pair may carry a context, the conversation's turns before the prompt
(system, user and assistant turns, hfedmoe.data.instruct). The whole conversation is one
example, rendered in one piece; **every assistant turn is learned** (its content and closing
tokens; as TRL's ``assistant_only_loss`` and FastChat do), every system and user turn is masked.
Without a chat template each user turn is a :data:`PLAIN_FORMAT` block, a system turn its text
and a blank line, each assistant turn its text and the end token.

Labels (what the loss sees): ``IGNORE_INDEX`` (-100, ignored by ``F.cross_entropy`` and by
transformers' causal-LM loss) on every prompt token and on padding; the response tokens and
the turn's closing tokens are learned, so the model learns to stop. Assistant turn i spans
from the longest common prefix of the conversation rendered up to turn i with the generation
prompt and the whole conversation, to that of the conversation rendered through turn i and
the whole: a template that renders an assistant turn differently from the generation prompt
still masks exactly the shared part.

Truncation at ``max_length``: the end of the conversation is cut; an example whose first
learned token falls beyond ``max_length`` is dropped, and the number dropped is reported.
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
    context: tuple[tuple[str, str], ...] = ()  # (role, content) turns before the prompt

    def turns(self) -> tuple[tuple[str, str], ...]:
        """The whole conversation: the context, the prompt (user), the response (assistant)."""
        return self.context + (("user", self.prompt), ("assistant", self.response))


# N tokenized conversations, right-padded to a common length T: input_ids, attention_mask and
# labels (N, T) int64 (labels: the token to learn at that position, or IGNORE_INDEX); dropped:
# pairs left out because the prompt alone filled max_length
CausalLMSet = TokenizedSet


def dataset_pairs(dataset: TextDataset) -> list[InstructionPair]:
    """The (prompt, response) pairs of an instruction dataset (hfedmoe.data.instruct)."""
    if len(dataset) and not dataset.responses:
        raise DataError("the dataset holds no responses: task 'causal-lm' needs instruction "
                        "pairs (hfedmoe.data.instruct)")
    contexts = dataset.contexts or ((),) * len(dataset)
    return [InstructionPair(p, r, c)
            for p, r, c in zip(dataset.texts, dataset.responses, contexts)]


def prompt_token_ids(tokenizer: Any, prompt: str,
                     context: tuple[tuple[str, str], ...] = ()) -> list[int]:
    """The token ids a model is given to answer ``prompt`` after the turns of ``context``: the
    start of :func:`pair_token_ids`'s conversation, ending where the response starts
    (generation, hfedmoe.tasks.causal_lm)."""
    turns = context + (("user", prompt),)
    if getattr(tokenizer, "chat_template", None):
        return _render(tokenizer, turns, generation_prompt=True)
    return _plain_token_ids(tokenizer, turns)[0]


def end_token_id(tokenizer: Any) -> int | None:
    """The token that ends a response in :data:`PLAIN_FORMAT`: eos, else sep (BERT-style
    vocabularies such as the tiny models' have no eos), else None."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None \
        else tokenizer.sep_token_id


def pair_token_ids(tokenizer: Any, pair: InstructionPair) -> tuple[list[int], list[int]]:
    """The conversation's token ids and labels: the token itself where it is learned (the
    assistant turns), ``IGNORE_INDEX`` elsewhere (module docstring)."""
    turns = pair.turns()
    if not getattr(tokenizer, "chat_template", None):
        return _plain_token_ids(tokenizer, turns)
    full = _render(tokenizer, turns)
    labels = [IGNORE_INDEX] * len(full)
    for i, (role, _) in enumerate(turns):
        if role == "assistant":
            start = _shared(_render(tokenizer, turns[:i], generation_prompt=True), full)
            end = _shared(_render(tokenizer, turns[: i + 1]), full)
            labels[start:end] = full[start:end]
    return full, labels


def first_learned(labels: Sequence[int]) -> int:
    """The position of the first learned token of ``labels`` (len(labels) when none)."""
    return next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))


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
        ids, labels = pair_token_ids(tokenizer, pair)
        if first_learned(labels) >= min(len(ids), max_length):
            dropped += 1  # no learned token fits (or the response is empty)
            continue
        rows.append((ids[:max_length], labels[:max_length]))
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


def _render(tokenizer: Any, turns: Sequence[tuple[str, str]],
            generation_prompt: bool = False) -> list[int]:
    """The chat template's token ids of ``turns`` (role, content)."""
    messages = [{"role": role, "content": content} for role, content in turns]
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                              tokenize=True))


def _plain_token_ids(tokenizer: Any, turns: Sequence[tuple[str, str]]
                     ) -> tuple[list[int], list[int]]:
    """Ids and labels of ``turns`` in the plain format (module docstring): the masked text
    before each assistant turn is encoded in one piece, with the tokenizer's special tokens
    only at the start of the conversation."""
    end = end_token_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    pending = ""

    def flush() -> None:
        chunk = tokenizer(pending, add_special_tokens=not ids)["input_ids"]
        ids.extend(chunk)
        labels.extend([IGNORE_INDEX] * len(chunk))

    for role, content in turns:
        if role != "assistant":
            pending += PLAIN_FORMAT.format(prompt=content) if role == "user" else f"{content}\n\n"
            continue
        if pending or not ids:
            flush()
        pending = ""
        learned = (tokenizer(content, add_special_tokens=False)["input_ids"]
                   + ([end] if end is not None else []))
        ids.extend(learned)
        labels.extend(learned)
    if pending:
        flush()
    return ids, labels


def _shared(prefix: Sequence[int], full: Sequence[int]) -> int:
    """The length of the longest common prefix of two id lists."""
    shared = 0
    for a, b in zip(prefix, full):
        if a != b:
            break
        shared += 1
    return shared


def _ids(rendered: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)."""
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return [int(i) for i in rendered]
