"""WordNet 3.0 glosses -> lexnames, and data.max-examples, against independent re-reads.

tests/fixtures/wordnet holds a few dozen synset lines copied verbatim from Debian's
wordnet-base (WordNet 3.0, with its licence notice, which allows redistribution).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest

from hfedmoe.config import parse_run_config
from hfedmoe.data import DataError, dirichlet_partition, load_corpus
from hfedmoe.data.corpora import Corpus, TextDataset, limit_examples, stratified_quotas
from hfedmoe.data.wordnet import LEXNAMES

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WORDNET = FIXTURES / "wordnet"
SYSTEM_WORDNET = Path("/usr/share/wordnet")


def data_config(**overrides: object):
    return dataclasses.replace(parse_run_config().data, **overrides)


def wordnet(**overrides: object) -> Corpus:
    return load_corpus(data_config(source="wordnet", path=str(WORDNET), **overrides))


def reread(folder: Path) -> dict[str, str]:
    """Gloss -> lexname, first occurrence over adj, adv, noun, verb (independent regex read)."""
    pattern = re.compile(r"^\d{8} (\d\d) [nvasr] .*? \| (.*?)\s*$")
    names = {}
    for part in ("adj", "adv", "noun", "verb"):
        for line in (folder / f"data.{part}").read_text().splitlines():
            match = pattern.match(line)
            assert match or line.startswith("  "), line
            if match:
                names.setdefault(" ".join(match[2].split()), LEXNAMES[int(match[1])])
    return names


def as_mapping(corpus: Corpus) -> dict[str, str]:
    return {t: corpus.label_names[y] for split in (corpus.train, corpus.test)
            for t, y in zip(split.texts, split.labels)}


# --- parsing ---------------------------------------------------------------------------

def test_lexnames_are_the_45_standard_names_in_file_number_order():
    assert len(LEXNAMES) == len(set(LEXNAMES)) == 45
    assert (LEXNAMES[0], LEXNAMES[3], LEXNAMES[5], LEXNAMES[28]) == (
        "adj.all", "noun.Tops", "noun.animal", "noun.time")
    assert (LEXNAMES[29], LEXNAMES[38], LEXNAMES[43], LEXNAMES[44]) == (
        "verb.body", "verb.motion", "verb.weather", "adj.ppl")


def test_glosses_are_labelled_by_lex_filenum_and_deduplicated():
    corpus = wordnet()
    expected = reread(WORDNET)
    assert corpus.label_names == LEXNAMES  # all 45, even those without examples
    assert as_mapping(corpus) == expected
    assert len(corpus.train) + len(corpus.test) == len(expected) == 37  # 39 lines, 2 repeats
    assert not set(corpus.train.texts) & set(corpus.test.texts)
    # repeated glosses keep the first occurrence's label (files read adj, adv, noun, verb)
    assert expected["a grain of barley"] == "noun.food"  # noun.plant's barleycorn comes later
    assert expected["capable of being managed or controlled"] == "adj.all"  # not noun.attribute
    # the text is the gloss alone (definition and quoted examples), never the lemmas
    assert "entity" not in " ".join(expected)  # noun.Tops 'entity' line's gloss
    assert any('"' in t for t in expected)


def test_split_follows_test_fraction_per_class():
    corpus = wordnet(test_fraction=0.25)
    full = Counter(as_mapping(corpus).values())
    test = Counter(corpus.label_names[y] for y in corpus.test.labels)
    assert test == +Counter({name: int(0.25 * n + 0.5) for name, n in full.items()})


def test_missing_folder_is_one_line_error_with_install_hint(tmp_path):
    for path in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(DataError) as info:
            load_corpus(data_config(source="wordnet", path=str(path)))
        message = str(info.value)
        assert "\n" not in message and str(path) in message
        assert "make bench-setup" in message and "apt-get install wordnet-base" in message
    (tmp_path / "data.noun").write_text((WORDNET / "data.noun").read_text())
    with pytest.raises(DataError, match="has no data.adj, data.adv, data.verb"):
        load_corpus(data_config(source="wordnet", path=str(tmp_path)))


def test_a_shipped_lexnames_file_must_match(tmp_path):
    for name in ("data.adj", "data.adv", "data.noun", "data.verb"):
        (tmp_path / name).write_text((WORDNET / name).read_text())
    lines = [f"{i:02d}\t{name}\t{1 + (i > 2)}" for i, name in enumerate(LEXNAMES)]
    (tmp_path / "lexnames").write_text("\n".join(lines) + "\n")
    assert as_mapping(load_corpus(data_config(source="wordnet", path=str(tmp_path)))) == reread(
        WORDNET)
    (tmp_path / "lexnames").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="only WordNet 3.0 is supported"):
        load_corpus(data_config(source="wordnet", path=str(tmp_path)))


def test_malformed_line_names_file_and_line(tmp_path):
    for name in ("data.adj", "data.adv", "data.noun", "data.verb"):
        (tmp_path / name).write_text((WORDNET / name).read_text())
    lines = (WORDNET / "data.verb").read_text().splitlines()
    (tmp_path / "data.verb").write_text("\n".join(lines[:30] + ["01234567 45 v 01 x 0 000 | y"]))
    with pytest.raises(DataError, match=r"data\.verb:31: lex_filenum 45"):
        load_corpus(data_config(source="wordnet", path=str(tmp_path)))
    (tmp_path / "data.verb").write_text("\n".join(lines[:30] + ["01234567 38 v 01 x 0 000"]))
    with pytest.raises(DataError, match=r"data\.verb:31: not a WordNet synset line"):
        load_corpus(data_config(source="wordnet", path=str(tmp_path)))


# --- data.max-examples -----------------------------------------------------------------

def test_stratified_quotas_by_hand_and_invariants():
    # shares 5, 2.5, 0.5: the last is pinned to 1; 7 over 10, 5 -> 4.67, 2.33 -> 4 + 1, 2
    assert stratified_quotas([10, 5, 1], 8) == [5, 2, 1]
    assert stratified_quotas([3, 3], 4) == [2, 2]
    assert stratified_quotas([2, 2, 2], 4) == [2, 1, 1]  # tie -> lower index
    assert stratified_quotas([1, 1, 1, 100], 4) == [1, 1, 1, 1]
    assert stratified_quotas([1, 99], 50) == [1, 49]  # share 0.5 -> 1; 49 over 99
    for sizes, total in (([7, 1, 30, 2, 9], 12), ([100, 3, 3, 50], 99), ([5] * 9, 9),
                         ([2, 1000], 1001), ([40, 1, 1, 1, 2, 500, 7], 60)):
        quotas = stratified_quotas(sizes, total)
        assert sum(quotas) == total and all(1 <= q <= s for q, s in zip(quotas, sizes))
        larger = [(q, s) for q, s in zip(quotas, sizes) if q > 1]  # proportional among these
        budget = total - (len(sizes) - len(larger))
        pool = sum(s for _, s in larger)
        assert all(abs(q - budget * s / pool) < 1 for q, s in larger)
        assert all(qa <= qb for qa, sa in zip(quotas, sizes) for qb, sb in zip(quotas, sizes)
                   if sa <= sb)  # a larger group never gets fewer


def groups(corpus: Corpus) -> Counter:
    return Counter([("train", y) for y in corpus.train.labels]
                   + [("test", y) for y in corpus.test.labels])


def test_max_examples_is_stratified_deterministic_and_at_most_n():
    full = wordnet()
    for n in (len(groups(full)), 20, 30):
        small = wordnet(max_examples=n)
        assert len(small.train) + len(small.test) == n
        assert small == wordnet(max_examples=n)  # deterministic (and independent of the seed)
        assert set(groups(small)) == set(groups(full))  # every (split, class) keeps >= 1
        keys = sorted(groups(full))
        quotas = stratified_quotas([groups(full)[k] for k in keys], n)
        assert [groups(small)[k] for k in keys] == quotas
        assert set(small.train.texts) <= set(full.train.texts)
        assert set(small.test.texts) <= set(full.test.texts)
        assert as_mapping(small).items() <= as_mapping(full).items()
        # both splits keep the full corpus's order
        for part, whole in ((small.train, full.train), (small.test, full.test)):
            positions = [whole.texts.index(t) for t in part.texts]
            assert positions == sorted(positions)
    assert wordnet(max_examples=37) == full == wordnet(max_examples=1000)
    with pytest.raises(DataError, match=r"data.max-examples = 5 is below the \d+ \(split, class\)"):
        wordnet(max_examples=5)


def test_max_examples_applies_to_every_source():
    jsonl = data_config(source="file", path=str(FIXTURES / "tiny.jsonl"))
    full = load_corpus(jsonl)
    small = load_corpus(dataclasses.replace(jsonl, max_examples=10))
    assert len(small.train) + len(small.test) == 10
    assert set(small.test.texts) <= set(full.test.texts) and len(set(small.test.labels)) == len(
        set(full.test.labels))
    bbc = load_corpus(data_config(max_examples=100))
    assert len(bbc.train) + len(bbc.test) == 100 and len(set(bbc.test.labels)) == 5
    assert len(bbc.test) == 20  # 425 of 2,127 held out -> 19.98 of 100


def test_limit_examples_picks_by_text_hash_not_position():
    names = ("x", "y")
    texts = tuple(f"t{i}" for i in range(40))
    corpus = Corpus(TextDataset(texts[:30], (0,) * 15 + (1,) * 15, names),
                    TextDataset(texts[30:], (0,) * 5 + (1,) * 5, names), names)
    small = limit_examples(corpus, 16)  # shares 6, 6 (train) and 2, 2 (test)
    assert Counter(small.train.labels) == {0: 6, 1: 6}
    assert Counter(small.test.labels) == {0: 2, 1: 2}
    rank = lambda t: hashlib.blake2b(t.encode(), digest_size=8, person=b"max-examples").digest()
    first = lambda members, k: set(sorted(members, key=rank)[:k])
    assert set(small.train.texts) == first(texts[:15], 6) | first(texts[15:30], 6)
    assert set(small.test.texts) == first(texts[30:35], 2) | first(texts[35:], 2)
    reversed_corpus = Corpus(corpus.train.subset(range(29, -1, -1)),
                             corpus.test.subset(range(9, -1, -1)), names)
    assert set(limit_examples(reversed_corpus, 16).train.texts) == set(small.train.texts)


# --- the real corpus (installed by `make bench-setup`) ---------------------------------

@pytest.mark.skipif(not (SYSTEM_WORDNET / "data.noun").is_file(),
                    reason="wordnet-base is not installed (make bench-setup)")
def test_system_wordnet_sizes_and_benchmark_partitions():
    full = load_corpus(data_config(source="wordnet"))
    assert len(full.train) + len(full.test) == 117_033  # 117,659 synsets, repeated glosses dropped
    assert len(set(full.train.labels)) == len(set(full.test.labels)) == 45
    small = load_corpus(data_config(source="wordnet", max_examples=8000))
    assert len(small.train) + len(small.test) == 8000 and len(set(small.test.labels)) == 45
    for alpha in (0.5, 0.1):  # the benchmark's 8 clients and min-partition-size 10
        parts = dirichlet_partition(small.train.labels, 8, alpha, 10, seed=0)
        assert sorted(i for p in parts for i in p) == list(range(len(small.train)))
        assert min(len(p) for p in parts) >= 10
