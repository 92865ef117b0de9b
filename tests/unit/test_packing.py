"""Packing (train.packing): best-fit-decreasing placement, and a packed row computes for each
of its examples exactly what the example alone computes (logits, per-sample routing means)."""

import pytest
import torch

from hfedmoe.config import ConfigError, parse_run_config
from hfedmoe.data.instructions import IGNORE_INDEX, InstructionPair, tokenize_instructions
from hfedmoe.data.packing import best_fit_decreasing, pack_examples
from hfedmoe.data.tokenize import eval_batches
from hfedmoe.model import load_tokenizer
from hfedmoe.tasks import task_for
from hfedmoe.training import forward_batch, sample_probabilities

PAIRS = [InstructionPair(f"What is {i} plus {i}?", " ".join(["even"] * (1 + i % 5)))
         for i in range(9)]


def test_best_fit_decreasing_places_each_example_once_within_capacity():
    # by hand: 5 -> new row (room 3); 4 -> new row (4); 3 -> the fullest that fits (row 0);
    # 3 -> row 1 (room 1); 2 -> new row; 1 -> row 1, the tightest fit
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    lengths = [7, 1, 3, 8, 2, 2, 5, 6, 4]
    rows = best_fit_decreasing(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert len(rows) == -(-sum(lengths) // 8)  # perfectly packable: 38 tokens, 5 rows
    with pytest.raises(Exception, match="does not fit"):
        best_fit_decreasing([9], 8)


@pytest.fixture(scope="module")
def tiny_lm():
    config = parse_run_config({"task": "causal-lm", "model.name": "tiny:qwen2_moe"})
    adapter = task_for("causal-lm").build_adapter(config.model, 0, 0)
    adapter.model.eval()
    return adapter, load_tokenizer(config.model)


def test_a_packed_row_computes_each_example_as_if_alone(tiny_lm):
    adapter, tokenizer = tiny_lm
    alone = tokenize_instructions(PAIRS, tokenizer, max_length=48)
    packed = pack_examples(alone, 48, tokenizer.pad_token_id)
    assert len(packed) < len(alone) and packed.num_examples == len(alone) == len(PAIRS)
    # every example's tokens and labels appear once, in one row, positions restarting at 0
    lengths = alone.attention_mask.sum(dim=1).tolist()
    with torch.no_grad():
        solo = adapter.model(alone.input_ids, alone.attention_mask)  # (N, T, V)
        batch = next(eval_batches(packed, len(packed)))
        together = forward_batch(adapter.model, batch)  # (R, T', V)
    found = 0
    for r in range(len(packed)):
        for k in range(1, int(packed.attention_mask[r].max()) + 1):
            cols = (packed.attention_mask[r] == k).nonzero().flatten()
            ids = packed.input_ids[r, cols]
            i = next(i for i in range(len(PAIRS)) if lengths[i] == len(cols)
                     and torch.equal(alone.input_ids[i, :lengths[i]], ids))
            assert packed.position_ids[r, cols].tolist() == list(range(len(cols)))
            assert torch.equal(packed.labels[r, cols[1:]], alone.labels[i, 1:lengths[i]])
            assert packed.labels[r, cols[0]] == IGNORE_INDEX
            assert torch.allclose(together[r, cols], solo[i, :lengths[i]], atol=1e-5)
            found += 1
    assert found == len(PAIRS)
    # the same logits without position_ids would let examples see each other: they differ
    with torch.no_grad():
        leaky = adapter.model(batch["input_ids"], batch["attention_mask"].clamp(max=1))
    assert not torch.allclose(leaky, together, atol=1e-3)


def test_per_sample_routing_means_count_each_packed_example_as_a_sample(tiny_lm):
    adapter, tokenizer = tiny_lm
    alone = tokenize_instructions(PAIRS, tokenizer, max_length=48)
    packed = pack_examples(alone, 48, tokenizer.pad_token_id)
    means = {}
    for data in (alone, packed):
        batch = next(eval_batches(data, len(data)))
        with torch.no_grad(), adapter.trace_routing() as trace:
            forward_batch(adapter.model, batch)
        means[data is packed] = sample_probabilities(trace, batch["attention_mask"])  # (L, B', S)
    assert means[True].shape == means[False].shape == (2, len(PAIRS), 8)
    # the same samples (in another order): compare sorted rows of the first layer
    a, b = (torch.stack(sorted(m[0], key=lambda row: row.tolist())) for m in
            (means[False], means[True]))
    assert torch.allclose(a, b, atol=1e-5)


def test_packing_is_refused_where_it_means_nothing():
    with pytest.raises(ConfigError, match="train.packing"):
        parse_run_config({"train.packing": True})  # classification
    with pytest.raises(ConfigError, match="train.packing"):
        parse_run_config({"task": "causal-lm", "method": "ho-sfl", "train.packing": True})
