"""Non-IID partitions of the TRAIN split across clients (flwr-datasets partitioners).

Every partitioner returns, for each client ``0..K-1``, a list of indices into the train
split. Contract: the partitions are disjoint, cover every train example (no loss, no
duplication), none is empty, and they are a pure function of (labels, config, seed) — every
client process recomputes the same partitions and keeps its own.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter
from typing import Callable, Sequence

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
    Partitioner,
)

from hfedmoe.config import DataConfig
from hfedmoe.data.corpora import Corpus, DataError, TextDataset

_LABEL = "label"
_INDEX = "index"


def partition_indices(labels: Sequence[int], cfg: DataConfig, seed: int,
                      label_names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices of each client's examples, by ``cfg.partition`` (iid | dirichlet | pathological |
    natural).
    ``label_names``: the names of the label ids, for error messages (ids when None)."""
    partitioners: dict[str, Callable[[], list[list[int]]]] = {
        "iid": lambda: iid_partition(labels, cfg.num_clients, seed),
        "dirichlet": lambda: dirichlet_partition(labels, cfg.num_clients, cfg.dirichlet_alpha,
                                                 cfg.min_partition_size, seed),
        "pathological": lambda: pathological_partition(labels, cfg.num_clients,
                                                       cfg.classes_per_client, seed, label_names),
        "natural": lambda: natural_partition(labels, cfg.num_clients, label_names),
    }
    if cfg.partition not in partitioners:
        raise DataError(f"unknown partition {cfg.partition!r}; expected one of {sorted(partitioners)}")
    return partitioners[cfg.partition]()


def client_train_set(corpus: Corpus, cfg: DataConfig, seed: int, partition_id: int) -> TextDataset:
    """Client ``partition_id``'s training examples: its partition minus its own test split."""
    return client_split(corpus, cfg, seed, partition_id)[0]


def client_split(corpus: Corpus, cfg: DataConfig, seed: int, partition_id: int,
                 partitions: Sequence[Sequence[int]] | None = None
                 ) -> tuple[TextDataset, TextDataset]:
    """Client ``partition_id``'s (train, test): its partition of ``corpus.train`` cut by
    :func:`split_partition` (``data.client-test-fraction`` = 0: an empty test split).
    ``partitions``: :func:`partition_indices` of this corpus and configuration when the caller
    keeps them (computing all N partitions costs O(N): 3 s for 1,000 IID clients of BBC News),
    else computed here.

    The client's test split never enters its (or anyone's) training; the global test split
    (``corpus.test``) is disjoint from every partition.
    """
    if not 0 <= partition_id < cfg.num_clients:
        raise DataError(f"partition id {partition_id} is out of range for "
                        f"data.num-clients = {cfg.num_clients}")
    if partitions is None:
        partitions = partition_indices(corpus.train.labels, cfg, seed, corpus.label_names)
    part = partitions[partition_id]
    train, test = split_partition(part, cfg.client_test_fraction, seed, partition_id)
    return corpus.train.subset(train), corpus.train.subset(test)


def client_test_size(partition_size: int, fraction: float) -> int:
    """Examples of a partition held out as the client's test split: round(fraction * n),
    at least 1 when fraction > 0, and always leaving at least 1 training example."""
    if fraction <= 0 or partition_size < 2:
        return 0
    return min(partition_size - 1, max(1, round(fraction * partition_size)))


def split_partition(indices: Sequence[int], fraction: float, seed: int, partition_id: int
                    ) -> tuple[list[int], list[int]]:
    """(train, test) indices of one partition: a uniformly random, seeded choice of
    :func:`client_test_size` examples is the test split; both keep the partition's order.
    A pure function of (indices, fraction, seed, partition_id): every process agrees."""
    size = client_test_size(len(indices), fraction)
    chosen = set(random.Random(f"{seed}/client-test/{partition_id}").sample(range(len(indices)),
                                                                             size))
    train = [int(i) for j, i in enumerate(indices) if j not in chosen]
    test = [int(i) for j, i in enumerate(indices) if j in chosen]
    return train, test


def client_split_sizes(labels: Sequence[int], cfg: DataConfig, seed: int,
                       label_names: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """(train, test) example counts of every client, without building any dataset (cheap:
    e.g. to bound the ``num-examples`` a client may claim in a reply)."""
    return [(len(part) - (test := client_test_size(len(part), cfg.client_test_fraction)), test)
            for part in partition_indices(labels, cfg, seed, label_names)]


def label_histogram(dataset: TextDataset) -> list[int]:
    """Examples per class id, ``len(dataset.label_names)`` entries."""
    counts = Counter(dataset.labels)
    return [counts[label] for label in range(len(dataset.label_names))]


def iid_partition(labels: Sequence[int], num_clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle cut into ``num_clients`` contiguous shards (sizes differ by <= 1)."""
    _check_counts(labels, num_clients)
    table = _table(labels).shuffle(seed=seed)
    return _run(IidPartitioner(num_partitions=num_clients), table, num_clients)


def dirichlet_partition(labels: Sequence[int], num_clients: int, alpha: float,
                        min_partition_size: int, seed: int) -> list[list[int]]:
    """Per class, client shares drawn from Dir(alpha); redrawn (<= 10 times) until every
    client holds >= ``min_partition_size`` examples. Smaller alpha = more skewed."""
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha = {alpha!r} is invalid: expected a number > 0")
    _check_counts(labels, num_clients)
    if num_clients * min_partition_size > len(labels):
        raise DataError(f"data.min-partition-size = {min_partition_size} for data.num-clients = "
                        f"{num_clients} needs {num_clients * min_partition_size} training "
                        f"examples but there are {len(labels)}; lower data.min-partition-size "
                        f"to at most {len(labels) // num_clients} or lower data.num-clients")
    partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by=_LABEL,
                                       alpha=float(alpha), min_partition_size=min_partition_size,
                                       self_balancing=False, shuffle=True, seed=seed)
    try:
        return _run(partitioner, _table(labels), num_clients,
                    "lower data.num-clients or raise data.min-partition-size")
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"no Dirichlet(alpha={alpha}) draw gave all {num_clients} clients >= "
                        f"{min_partition_size} examples in 11 tries; raise data.dirichlet-alpha "
                        "(less skew), lower data.min-partition-size or data.num-clients, or try "
                        "another seed") from exc


def pathological_partition(labels: Sequence[int], num_clients: int, classes_per_client: int,
                           seed: int, label_names: Sequence[str] | None = None
                           ) -> list[list[int]]:
    """Each client holds exactly ``classes_per_client`` classes; client k's first class is
    ``k mod C``, the rest are drawn with ``seed`` ("first-deterministic", Li et al. 2022).

    Raises DataError (naming classes by ``label_names``, and hfedmoe keys) if a class would be
    split over more clients than it has examples, or ends up on no client (possible when
    clients < classes).
    """
    _check_counts(labels, num_clients)
    classes = sorted(set(labels))
    name = (lambda y: repr(label_names[y])) if label_names else repr
    setting = (f"data.partition = 'pathological' with data.num-clients = {num_clients} and "
               f"data.classes-per-client = {classes_per_client}")
    if not 1 <= classes_per_client <= len(classes):
        raise DataError(f"data.classes-per-client = {classes_per_client} is invalid: the "
                        f"training data has {len(classes)} classes")
    partitioner = PathologicalPartitioner(
        num_partitions=num_clients, partition_by=_LABEL, num_classes_per_partition=classes_per_client,
        class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
    try:
        parts = _run(partitioner, _table(labels), num_clients,
                     "lower data.num-clients or raise data.classes-per-client")
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        found = re.search(r"Label: (\d+)", str(exc))
        which = f"class {name(int(found.group(1)))}" if found else "a class"
        raise DataError(f"{setting}: {which} would be split over more clients than it has "
                        "training examples; lower data.num-clients or data.classes-per-client"
                        ) from exc
    covered = {labels[i] for part in parts for i in part}
    if len(covered) < len(classes):
        missing = ", ".join(name(y) for y in sorted(set(classes) - covered))
        raise DataError(f"{setting} leaves classes {missing} on no client; raise "
                        f"data.num-clients to >= {len(classes)} (then every class is some "
                        f"client's first class) or data.classes-per-client")
    return parts


def natural_partition(labels: Sequence[int], num_clients: int,
                      label_names: Sequence[str] | None = None) -> list[list[int]]:
    """Whole groups per client: the label values present in the training data (topics,
    lexicographer files, user ids: the realistic non-IID split of instruction data), in sorted
    order, dealt round-robin, so client k holds the k-th, (k+K)-th, ... groups with all their
    examples, in order. With as many clients as groups this is one client per group
    (flwr-datasets' NaturalIdPartitioner). Raises DataError when there are more clients than
    groups."""
    present = sorted(set(labels))
    if num_clients > len(present):
        shown = ", ".join(repr(label_names[y]) if label_names else str(y) for y in present[:6])
        more = ", ..." if len(present) > 6 else ""
        raise DataError(f"data.partition = 'natural' gives each client whole groups, but the "
                        f"training data has {len(present)} ({shown}{more}) for data.num-clients "
                        f"= {num_clients}; lower data.num-clients to at most {len(present)}")
    client_of = {label: k % num_clients for k, label in enumerate(present)}
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for index, label in enumerate(labels):
        parts[client_of[label]].append(index)
    return parts


def _check_counts(labels: Sequence[int], num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"number of clients = {num_clients} is invalid: expected >= 1")
    if num_clients > len(labels):
        raise DataError(f"{num_clients} clients but only {len(labels)} training examples; "
                        "lower data.num-clients")


def _table(labels: Sequence[int]) -> datasets.Dataset:
    """(label, index) rows: the partitioner sees labels, we read back original indices."""
    return datasets.Dataset.from_dict({_LABEL: [int(y) for y in labels],
                                       _INDEX: list(range(len(labels)))})


def _run(partitioner: Partitioner, table: datasets.Dataset, num_clients: int,
         remedy: str = "lower data.num-clients") -> list[list[int]]:
    partitioner.dataset = table
    with warnings.catch_warnings():  # redraw / unused-class warnings: we raise instead
        warnings.simplefilter("ignore", UserWarning)
        parts = [list(partitioner.load_partition(k)[_INDEX]) for k in range(num_clients)]
    empty = [k for k, part in enumerate(parts) if not part]
    if empty:
        raise DataError(f"client {empty[0]} got an empty partition ({len(empty)} empty of "
                        f"{num_clients}); {remedy}")
    return parts
