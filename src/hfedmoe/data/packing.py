"""Packing (``train.packing``): several causal-LM training examples per row of
``model.max-length`` tokens, so that short instruction pairs do not spend most of each row on
padding.

Placement: best-fit decreasing (as TRL's default ``packing_strategy = "bfd"``): examples in
order of decreasing length (ties by their order in the set), each into the open row with the
least room that still holds it whole, else a new row. No example is split or truncated by
packing (tokenisation already cut each to ``max_length``), none is dropped or repeated.

Layout of a packed set (axolotl's sample-packing convention, understood by transformers 5):

* ``attention_mask`` (N, T): 0 on padding, k >= 1 on the tokens of the row's k-th example.
  Everything that needs only "real token or not" reads it as a boolean; the per-sample
  statistics of the methods (HFedMoE's Eqs. 3-5 and 16, FedAlign's routing distribution,
  hfedmoe.training.sample_means) treat each example as its own sample, as without packing;
* ``position_ids`` (N, T): each example's positions start again at 0 (padding too). The model
  is then called with ``position_ids`` and no attention mask; transformers'
  ``find_packed_sequence_indices`` reads the restarts and builds a block-diagonal causal mask,
  so every example attends only to itself and its logits equal those of the example alone
  (a test checks this);
* ``labels`` (N, T): each example's own labels; the first token of every example is never
  learned (the logits before it belong to the previous example).

Evaluation sets are not packed: the loss per response token is the same either way, and an
unpacked set keeps batches and metrics comparable across runs.
"""

from __future__ import annotations

import torch

from hfedmoe.data.corpora import DataError
from hfedmoe.data.instructions import IGNORE_INDEX
from hfedmoe.data.tokenize import TokenizedSet


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of example indices: each row's lengths sum to at most ``capacity`` (module
    docstring); raises DataError if an example is longer than ``capacity``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise DataError(f"an example of {lengths[i]} tokens does not fit a packed row of "
                            f"{capacity}")
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: (room[r], r))
            rows[best].append(i)
            room[best] -= lengths[i]
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_examples(data: TokenizedSet, max_length: int, pad_id: int) -> TokenizedSet:
    """``data`` (right-padded causal-LM examples, one per row) packed into rows of at most
    ``max_length`` tokens (module docstring). ``pad_id`` fills the rest of each row."""
    if data.labels.dim() != 2 or data.position_ids is not None:
        raise DataError("packing needs unpacked causal-LM examples (labels per token)")
    lengths = [int(n) for n in data.attention_mask.sum(dim=1)]
    rows = best_fit_decreasing(lengths, max_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    segments = torch.zeros((len(rows), width), dtype=torch.int64)
    positions = torch.zeros((len(rows), width), dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, start=1):
            n = lengths[i]
            input_ids[r, at:at + n] = data.input_ids[i, :n]
            labels[r, at:at + n] = data.labels[i, :n]
            labels[r, at] = IGNORE_INDEX  # predicted from the previous example's last token
            segments[r, at:at + n] = k
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return TokenizedSet(input_ids, segments, labels, data.dropped, position_ids=positions)
