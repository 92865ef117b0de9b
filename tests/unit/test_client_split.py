"""Each client's own test split: disjoint from its training split, deterministic, sized as
documented, and empty when data.client-test-fraction = 0."""

from __future__ import annotations

import dataclasses
import random

import pytest

from hfedmoe.config import parse_run_config
from hfedmoe.data import (
    Corpus,
    TextDataset,
    client_split,
    client_split_sizes,
    client_test_size,
    client_train_set,
    partition_indices,
)
from hfedmoe.data.partition import split_partition

NAMES = tuple(map(str, range(4)))
LABELS = tuple(random.Random(1).choices(range(4), k=400))
TEXTS = tuple(f"text {i}" for i in range(len(LABELS)))
CORPUS = Corpus(TextDataset(TEXTS, LABELS, NAMES), TextDataset(("held out",), (0,), NAMES), NAMES)


def data_config(**overrides):
    return dataclasses.replace(parse_run_config().data, num_clients=5, **overrides)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_is_a_disjoint_cover_of_the_partition_and_deterministic(fraction):
    cfg = data_config(client_test_fraction=fraction)
    parts = partition_indices(LABELS, cfg, seed=3)
    sizes = client_split_sizes(LABELS, cfg, seed=3)
    for client, part in enumerate(parts):
        train, test = client_split(CORPUS, cfg, 3, client)
        again = client_split(CORPUS, cfg, 3, client)
        assert (train, test) == again  # a pure function: every process agrees
        assert set(train.texts).isdisjoint(test.texts)
        assert sorted(train.texts + test.texts) == sorted(TEXTS[i] for i in part)
        assert len(test) == round(fraction * len(part)) and len(test) >= 1
        assert sizes[client] == (len(train), len(test))
        assert client_train_set(CORPUS, cfg, 3, client) == train
        assert "held out" not in train.texts + test.texts  # the global test split is apart


def test_split_is_seeded_per_run_and_client_not_the_first_rows():
    indices = list(range(100, 200))
    train, test = split_partition(indices, 0.2, seed=0, partition_id=0)
    assert split_partition(indices, 0.2, seed=0, partition_id=0) == (train, test)
    assert split_partition(indices, 0.2, seed=1, partition_id=0)[1] != test
    assert split_partition(indices, 0.2, seed=0, partition_id=1)[1] != test
    assert test != indices[:20] and train == [i for i in indices if i not in test]


def test_zero_fraction_means_no_client_test_split():
    cfg = data_config(client_test_fraction=0.0)
    parts = partition_indices(LABELS, cfg, seed=1)
    for client, part in enumerate(parts):
        train, test = client_split(CORPUS, cfg, 1, client)
        assert len(test) == 0 and train.texts == tuple(TEXTS[i] for i in part)
    assert all(test == 0 for _, test in client_split_sizes(LABELS, cfg, 1))


@pytest.mark.parametrize("size, fraction, expected", [
    (10, 0.2, 2), (3, 0.1, 1), (2, 0.9, 1), (1, 0.5, 0), (7, 0.0, 0), (100, 0.25, 25)])
def test_client_test_size(size, fraction, expected):
    assert client_test_size(size, fraction) == expected
