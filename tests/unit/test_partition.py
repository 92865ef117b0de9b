"""Client partitions: determinism, coverage, skew, and every documented error."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest

from hfedmoe.config import DataConfig, parse_run_config
from hfedmoe.data import (
    Corpus,
    DataError,
    TextDataset,
    client_train_set,
    dirichlet_partition,
    iid_partition,
    label_histogram,
    partition_indices,
    pathological_partition,
)

NUM_CLASSES = 5
# 750 examples, 5 classes of unequal size, in a random order.
LABELS = tuple(random.Random(0).sample([c for c in range(NUM_CLASSES) for _ in range(100 + 25 * c)], 750))


def data_config(**overrides: object) -> DataConfig:
    return dataclasses.replace(parse_run_config().data, **overrides)


def entropy(labels: list[int]) -> float:
    counts = Counter(labels)
    return -sum(n / len(labels) * math.log(n / len(labels)) for n in counts.values())


def check_exact_cover(parts: list[list[int]], size: int) -> None:
    flat = [i for part in parts for i in part]
    assert len(flat) == size and sorted(flat) == list(range(size))  # no loss, no duplicate


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_same_seed_same_partitions_and_exact_cover(partition):
    cfg = data_config(partition=partition, num_clients=8)
    parts = partition_indices(LABELS, cfg, seed=3)
    assert len(parts) == 8 and all(parts)
    assert parts == partition_indices(LABELS, cfg, seed=3)
    check_exact_cover(parts, len(LABELS))


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_seed_changes_partitions(partition):
    cfg = data_config(partition=partition, num_clients=8)
    as_sets = lambda seed: [set(p) for p in partition_indices(LABELS, cfg, seed)]
    assert as_sets(0) != as_sets(1)


def test_iid_sizes_and_label_mix():
    parts = iid_partition(LABELS, 7, seed=0)
    assert sorted(len(p) for p in parts) == [107] * 6 + [108]
    overall = entropy(list(LABELS))
    assert all(entropy([LABELS[i] for i in p]) > 0.9 * overall for p in parts)


def test_dirichlet_small_alpha_is_more_skewed_than_iid():
    mean_entropy = lambda parts: sum(entropy([LABELS[i] for i in p]) for p in parts) / len(parts)
    iid = mean_entropy(iid_partition(LABELS, 8, seed=0))
    skewed = mean_entropy(dirichlet_partition(LABELS, 8, alpha=0.1, min_partition_size=5, seed=0))
    mild = mean_entropy(dirichlet_partition(LABELS, 8, alpha=100.0, min_partition_size=5, seed=0))
    assert skewed < 0.6 * iid
    assert skewed < mild


def test_dirichlet_respects_min_partition_size():
    unconstrained = dirichlet_partition(LABELS, 10, alpha=0.5, min_partition_size=0, seed=1)
    assert min(len(p) for p in unconstrained) < 40  # so the first draw had to be redrawn
    parts = dirichlet_partition(LABELS, 10, alpha=0.5, min_partition_size=40, seed=1)
    assert min(len(p) for p in parts) >= 40
    check_exact_cover(parts, len(LABELS))


@pytest.mark.parametrize("per_client", [1, 2, 3])
def test_pathological_clients_hold_n_classes(per_client):
    parts = pathological_partition(LABELS, 6, per_client, seed=0)
    for part in parts:
        assert len({LABELS[i] for i in part}) == per_client
    check_exact_cover(parts, len(LABELS))


def test_label_histogram_counts():
    data = TextDataset(("a", "b", "c", "d"), (2, 0, 2, 2), ("x", "y", "z", "w"))
    assert label_histogram(data) == [1, 0, 3, 0]


def test_client_train_set_is_the_partition():
    texts = tuple(f"text {i}" for i in range(len(LABELS)))
    names = tuple(map(str, range(NUM_CLASSES)))
    corpus = Corpus(TextDataset(texts, LABELS, names), TextDataset(("t",), (0,), names), names)
    cfg = data_config(num_clients=4, client_test_fraction=0.0)  # no per-client test split
    parts = partition_indices(LABELS, cfg, seed=2)
    for client in range(4):
        mine = client_train_set(corpus, cfg, 2, client)
        assert mine.texts == tuple(f"text {i}" for i in parts[client])
        assert mine.labels == tuple(LABELS[i] for i in parts[client])


@pytest.mark.parametrize("call, fragment", [
    (lambda: dirichlet_partition(LABELS, 4, 0.0, 1, 0), "alpha"),
    (lambda: dirichlet_partition(LABELS, 4, -1.0, 1, 0), "alpha"),
    (lambda: iid_partition(LABELS[:5], 6, 0), "6 clients but only 5"),
    (lambda: dirichlet_partition(LABELS[:5], 6, 0.5, 0, 0), "6 clients but only 5"),
    (lambda: pathological_partition(LABELS, 4, 6, 0), "data has 5 classes"),
    (lambda: pathological_partition(LABELS, 2, 1, 0), "on no client"),
    (lambda: dirichlet_partition(LABELS[:30], 20, 0.01, 0, 0), "empty partition"),
    (lambda: dirichlet_partition(LABELS, 8, 0.05, 90, 0), "min-partition-size"),
])
def test_partition_errors(call, fragment):
    with pytest.raises(DataError) as info:
        call()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_empty_partition_error_names_the_client():
    with pytest.raises(DataError, match=r"^client \d+ got an empty partition"):
        dirichlet_partition(LABELS[:30], 20, 0.01, 0, 0)


@pytest.mark.parametrize("partition_id", [-1, 8])
def test_partition_id_out_of_range(partition_id):
    names = ("a", "b")
    data = TextDataset(tuple(f"t{i}" for i in range(20)), tuple(i % 2 for i in range(20)), names)
    with pytest.raises(DataError, match=f"partition id {partition_id} is out of range"):
        client_train_set(Corpus(data, data, names), data_config(num_clients=8), 0, partition_id)
