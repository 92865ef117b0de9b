"""Tokenisation and mini-batches.

A :class:`TokenizedSet` is padded to its longest text (after truncation); every batch is
trimmed to the span of columns that hold a real token in some row of the batch, so short
batches cost less CPU and no non-padding token is ever dropped (left or right padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from hfedmoe.config import DataConfig
from hfedmoe.data.corpora import Corpus, DataError, TextDataset, load_corpus

# input_ids (B, T), attention_mask (B, T), labels (B,) or (B, T), and position_ids (B, T) of a
# packed set (hfedmoe.data.packing); int64
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class TokenizedSet:
    """Token ids and labels of N texts, padded to a common length T.

    ``labels``: (N,) class ids (classification) or (N, T) the token to learn at each position,
    -100 where nothing is learned (causal-lm, hfedmoe.data.instructions; unshifted: position t
    holds token t, the model's logits at t-1 predict it).
    """

    input_ids: torch.Tensor       # (N, T) int64
    attention_mask: torch.Tensor  # (N, T) int64, 1 = token, 0 = padding (packed: k = k-th example)
    labels: torch.Tensor          # (N,) or (N, T) int64
    dropped: int = 0              # examples left out by tokenisation (causal-lm: no room to learn)
    # (N, T) int64 positions restarting at 0 for each example of a packed row
    # (hfedmoe.data.packing); None when each row holds one example
    position_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.attention_mask.shape != self.input_ids.shape:
            raise DataError(f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                            f"{tuple(self.attention_mask.shape)} must share a shape (N, T)")
        if self.labels.shape not in ((self.input_ids.shape[0],), self.input_ids.shape):
            raise DataError(f"labels {tuple(self.labels.shape)} must have shape "
                            f"({self.input_ids.shape[0]},) or {tuple(self.input_ids.shape)}")
        if self.position_ids is not None and self.position_ids.shape != self.input_ids.shape:
            raise DataError(f"position_ids {tuple(self.position_ids.shape)} must have shape "
                            f"{tuple(self.input_ids.shape)}")
        for name in ("input_ids", "attention_mask", "labels", "position_ids"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.dtype != torch.int64:
                raise DataError(f"{name} must be int64, got {tensor.dtype}")

    def __len__(self) -> int:
        """Rows (a packed row holds several examples: :attr:`num_examples`)."""
        return self.input_ids.shape[0]

    @property
    def num_examples(self) -> int:
        """Examples held (= rows unless packed)."""
        if self.position_ids is None:
            return len(self)
        return int(self.attention_mask.amax(dim=1).sum())


def load_tokenizable_corpus(cfg: DataConfig, tokenizer: Any) -> Corpus:
    """:func:`load_corpus`, then :func:`drop_untokenizable`: the corpus every process of a run
    (server and clients) partitions, so that all see the same examples."""
    return drop_untokenizable(load_corpus(cfg), tokenizer)


def drop_untokenizable(corpus: Corpus, tokenizer: Any, prefix_chars: int = 256) -> Corpus:
    """``corpus`` without the texts that ``tokenizer`` maps to no token of their own (special
    tokens such as [CLS] not counted; e.g. a text of control characters for a byte-level
    tokenizer). Such a row would reach the model as padding only. Each drop is reported in
    ``Corpus.notes``; raises DataError if a split would be left empty.

    Only the first ``prefix_chars`` characters of each text are encoded first: a prefix that
    yields a token shows the whole text does (tokens come from the text's characters; the
    normalisers and pre-tokenizers of transformers' tokenizers never remove a character
    because of what follows far behind it). Texts whose prefix yields none are encoded whole,
    so the result equals encoding every text whole, at a fraction of the cost on long texts.
    """
    splits, notes = [], list(corpus.notes)
    for name, split in (("train", corpus.train), ("test", corpus.test)):
        keep = _tokenizable_rows(list(split.texts), tokenizer, prefix_chars)
        if not keep:
            raise DataError(f"the tokenizer maps every text of the {name} split to no token")
        if len(keep) < len(split):
            notes.append(f"dropped {len(split) - len(keep)} {name} text(s) that the tokenizer "
                         "maps to no token")
            split = split.subset(keep)
        splits.append(split)
    return Corpus(splits[0], splits[1], corpus.label_names, notes=tuple(notes))


def _tokenizable_rows(texts: list[str], tokenizer: Any, prefix_chars: int) -> list[int]:
    """Indices of ``texts`` that ``tokenizer`` maps to at least one token of their own."""
    def has_tokens(batch: list[str]) -> list[bool]:
        if not batch:  # the fast tokenizers refuse an empty batch
            return []
        encoded = tokenizer(batch, add_special_tokens=False,
                            verbose=False)["input_ids"]  # no "longer than the maximum" warning
        return [len(ids) > 0 for ids in encoded]

    found = has_tokens([t[:prefix_chars] for t in texts])
    unsure = [i for i, ok in enumerate(found) if not ok and len(texts[i]) > prefix_chars]
    for i, ok in zip(unsure, has_tokens([texts[i] for i in unsure])):
        found[i] = ok
    return [i for i, ok in enumerate(found) if ok]


def tokenize(dataset: TextDataset, tokenizer: Any, max_length: int) -> TokenizedSet:
    """Tokenize every text (truncated to ``max_length`` tokens, padded to the longest).

    ``tokenizer`` is a Hugging Face tokenizer with a pad token; its padding side is kept.
    """
    if max_length < 1:
        raise DataError(f"max_length = {max_length} is invalid: expected an integer >= 1")
    if len(dataset) == 0:
        raise DataError("cannot tokenize an empty dataset")
    if tokenizer.pad_token_id is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no pad token; set one first")
    encoded = tokenizer(list(dataset.texts), padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt", return_token_type_ids=False)
    return TokenizedSet(input_ids=encoded["input_ids"].to(torch.int64),
                        attention_mask=encoded["attention_mask"].to(torch.int64),
                        labels=torch.tensor(dataset.labels, dtype=torch.int64))


def batches(tokenized: TokenizedSet, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Shuffled, trimmed mini-batches forever.

    Each epoch is a fresh permutation drawn from ``generator`` cut into batches of
    ``batch_size`` (the last one of an epoch may be smaller), so every epoch visits every
    example exactly once.
    """
    _check(tokenized, batch_size)

    def stream() -> Iterator[Batch]:
        while True:
            order = torch.randperm(len(tokenized), generator=generator)
            for start in range(0, len(tokenized), batch_size):
                yield _batch(tokenized, order[start:start + batch_size])

    return stream()


def eval_batches(tokenized: TokenizedSet, batch_size: int) -> Iterator[Batch]:
    """One pass in order, trimmed batches of ``batch_size`` (the last may be smaller)."""
    _check(tokenized, batch_size)
    rows = torch.arange(len(tokenized))
    return (_batch(tokenized, rows[start:start + batch_size])
            for start in range(0, len(tokenized), batch_size))


def _check(tokenized: TokenizedSet, batch_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size = {batch_size} is invalid: expected an integer >= 1")
    if len(tokenized) == 0:
        raise DataError("cannot batch an empty tokenized set")


def _batch(tokenized: TokenizedSet, rows: torch.Tensor) -> Batch:
    mask = tokenized.attention_mask[rows]  # (B, T)
    columns = mask.any(dim=0).nonzero().flatten()
    first, last = (int(columns[0]), int(columns[-1]) + 1) if len(columns) else (0, 1)
    labels = tokenized.labels[rows]
    batch = {"input_ids": tokenized.input_ids[rows, first:last],
             "attention_mask": mask[:, first:last],
             "labels": labels[:, first:last] if labels.dim() == 2 else labels}
    if tokenized.position_ids is not None:  # packed rows (hfedmoe.data.packing)
        batch["position_ids"] = tokenized.position_ids[rows, first:last]
    return batch
