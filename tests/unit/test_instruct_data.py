"""Instruction corpora (hfedmoe.data.instruct): row shapes, groups, splits, errors, sources."""

import json
from pathlib import Path

import pytest

from hfedmoe.config import parse_run_config
from hfedmoe.data import DataError
from hfedmoe.data.instruct import (
    canonical,
    load_instruction_corpus,
    load_quiz,
    row_pair,
    rows_to_instruction_corpus,
)
from hfedmoe.data.partition import client_split, natural_partition

TINY_INSTRUCT = "conf/data/tiny-instruct.jsonl"


def data_cfg(**overrides):
    flat = {"task": "causal-lm", "data.source": "file", "data.path": "x.jsonl",
            **{f"data.{k.replace('_', '-')}": v for k, v in overrides.items()}}
    return parse_run_config(flat).data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "Add", "input": "2 and 3", "output": "5"}, ("Add\n\n2 and 3", "5", ())),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, ("Say hi", "hi", ())),
    ({"prompt": "p", "response": "r"}, ("p", "r", ())),
    ({"prompt": "p", "completion": "c"}, ("p", "c", ())),
    ({"question": "q", "answer": "a"}, ("q", "a", ())),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                   {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                   {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"}]},
     ("u2", "a2", (("system", "s"), ("user", "u1"), ("assistant", "a1")))),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
     ("u", "a", ())),
])
def test_the_common_row_shapes_give_their_pair(row, expected):
    assert row_pair(row, "row 0") == expected


@pytest.mark.parametrize("row, message", [
    ({"text": "t", "label": "x"}, "no instruction fields"),
    ({"messages": [{"role": "user", "content": "u"}]}, "no user turn followed by"),
    ({"messages": "hello"}, "must be a list of objects"),
    ({"messages": [{"role": "tool", "content": "t"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}]}, "turn 1 has role 'tool'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}]}, "turn 1 has content a number"),
    ({"prompt": 5, "response": "r"}, "field 'prompt' is a number"),
])
def test_rows_without_a_pair_are_one_line_errors(row, message):
    with pytest.raises(DataError, match=message) as info:
        rows_to_instruction_corpus([row] * 4, data_cfg(), "data.path 'x.jsonl'", [1, 2, 3, 4])
    assert "\n" not in str(info.value) and "x.jsonl'" in str(info.value)


def test_empty_pairs_are_dropped_and_reported(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    rows += [{"prompt": "  ", "response": "r"}, {"prompt": "p", "response": None}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    corpus = load_instruction_corpus(data_cfg(path=str(path)))
    assert len(corpus.train) + len(corpus.test) == 10
    assert corpus.notes == (f"data.path '{path}': dropped 2 rows with an empty prompt or "
                            "response (lines 11, 12)",)
    pairs = set(zip(corpus.train.texts + corpus.test.texts,
                    corpus.train.responses + corpus.test.responses))
    assert pairs == {(f"p{i}", f"r{i}") for i in range(10)}  # nothing else lost or mixed


def test_groups_split_per_group_and_a_missing_group_is_named(tmp_path):
    rows = [{"prompt": f"{t} {i}", "response": str(i), "topic": t}
            for t in ("a", "b") for i in range(10)]
    corpus = load_instruction_corpus(data_cfg(path=str(write_jsonl(tmp_path / "g.jsonl", rows)),
                                              label_field="topic", test_fraction=0.2))
    assert corpus.label_names == ("a", "b")
    assert sorted(corpus.test.labels) == [0, 0, 1, 1]  # round(0.2 * 10) of each group
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:3] + [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match=r"bad.jsonl':4: field 'topic' is missing"):
        load_instruction_corpus(data_cfg(path=str(bad), label_field="topic"))


def test_the_split_depends_on_the_data_alone(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)]
    first = load_instruction_corpus(data_cfg(path=str(write_jsonl(tmp_path / "1.jsonl", rows))))
    again = load_instruction_corpus(
        data_cfg(path=str(write_jsonl(tmp_path / "2.jsonl", rows[::-1]))))
    assert first.test == again.test and first.train == again.train
    assert not set(first.test.texts) & set(first.train.texts)


def test_natural_partition_gives_whole_groups_to_clients():
    labels = [2, 0, 1, 0, 2, 2, 3]
    assert natural_partition(labels, 4) == [[1, 3], [2], [0, 4, 5], [6]]  # one group each
    assert natural_partition(labels, 2) == [[0, 1, 3, 4, 5], [2, 6]]  # groups 0, 2 | 1, 3
    with pytest.raises(DataError, match=r"the training data has 4 \('w', 'x', 'y', 'z'\) for "
                                        r"data.num-clients = 5; lower data.num-clients to at "
                                        r"most 4"):
        natural_partition(labels, 5, ("w", "x", "y", "z"))


def test_the_shipped_tiny_instruction_file_splits_naturally_by_topic():
    config = parse_run_config({
        "task": "causal-lm", "data.source": "file", "data.path": TINY_INSTRUCT,
        "data.label-field": "topic", "data.partition": "natural", "data.num-clients": 4})
    corpus = load_instruction_corpus(config.data)
    assert corpus.label_names == ("capitals", "numbers", "opposites", "plurals")
    for client in range(4):
        train, test = client_split(corpus, config.data, config.seed, client)
        assert set(train.labels) == {client} and len(train) > 20


def test_quiz_values_resolve_to_their_full_first_form():
    assert canonical("{G{eorge} }Washington") == "George Washington"
    assert canonical("M[iddle{-}Earth|E]") == "Middle-Earth"
    assert canonical("actors|soldiers") == "actors"
    assert canonical("{I }[injure|thwart]") == "I injure"
    assert canonical("13{(odd nos.)}") == "13"  # a parenthesised note is not the answer


def test_quiz_source_reads_an_index_and_its_topics(tmp_path):
    (tmp_path / "index").write_text(f"{tmp_path}/africa:Africa{{n}}:cap{{ital}}\n"
                                    f"{tmp_path}/elements:symbol:number:weight:element\n")
    (tmp_path / "africa").write_text("Algeria:Algiers\nAngola:Luanda\nKenya:Nairobi\n"
                                     "Ghana:Accra\nMali:Bamako\n")
    (tmp_path / "elements").write_text("H:1:1.008:Hydrogen\nHe:2:4.003:\\\nHelium\n")
    corpus = load_quiz(data_cfg(source="quiz", path=str(tmp_path), test_fraction=0.2))
    pairs = dict(zip(corpus.train.texts + corpus.test.texts,
                     corpus.train.responses + corpus.test.responses))
    assert pairs["African: Algeria. What is the capital?"] == "Algiers"
    assert pairs["symbol: He. What is the element?"] == "Helium"  # a continued line
    assert pairs["symbol: H. What is the weight?"] == "1.008"
    assert len(pairs) == 5 + 2 * 3 and corpus.label_names == ("africa", "elements")


def test_quiz_source_without_bsdgames_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install bsdgames"):
        load_quiz(data_cfg(source="quiz", path=str(tmp_path / "none")))


def test_wordnet_instructions_define_words_from_the_fixture():
    corpus = load_instruction_corpus(data_cfg(source="wordnet", path="tests/fixtures/wordnet"))
    pairs = dict(zip(corpus.train.texts + corpus.test.texts,
                     corpus.train.responses + corpus.test.responses))
    assert pairs["What does the verb 'rain' mean?"] == "precipitate as rain"
    assert all(not r.startswith('"') and '"' not in r[:1] for r in pairs.values())
    # synonyms: the synset's other words, in WordNet's order, underscores as spaces
    assert pairs["What are synonyms of the verb 'breathe'?"] == "take a breath, respire, suspire"
    assert pairs["What are synonyms of the noun 'Animalia'?"] == "kingdom Animalia, animal kingdom"
    # hypernyms: the first @ pointer's synset, by its first word (nouns: a kind of; verbs: a way to)
    assert pairs["What is the noun 'mythical being' a kind of?"] == "imaginary being"
    assert pairs["What is the verb 'rain' a way to?"] == "precipitate"
    # Animalia's hypernym (07940552) is not in the fixture: no question about it
    assert not any(p.startswith("What is the noun 'Animalia'") for p in pairs)
    assert "What are synonyms of the noun 'dog'?" not in pairs  # no such synset here
    kinds = {p.split("'")[0] + p.split("'")[-1] for p in pairs}
    assert kinds == {"What does the noun  mean?", "What does the verb  mean?",
                     "What does the adjective  mean?", "What does the adverb  mean?",
                     "What are synonyms of the noun ?", "What are synonyms of the verb ?",
                     "What are synonyms of the adjective ?", "What are synonyms of the adverb ?",
                     "What is the noun  a kind of?", "What is the verb  a way to?"}


def test_wordnet_instructions_ask_first_senses_only_and_name_instances(tmp_path):
    for name in ("data.adj", "data.adv", "data.verb"):
        (tmp_path / name).write_text("  licence header line\n")
    (tmp_path / "data.noun").write_text(
        "  licence header line\n"
        "00000100 15 n 02 national_capital 0 capital 0 000 | the capital city of a nation  \n"
        "00000200 15 n 02 Paris 0 City_of_Light 0 001 @i 00000100 n 0000 | the capital of France  \n"
        "00000300 15 n 01 Paris 1 001 @ 00000100 n 0000 | a later sense: never asked about  \n"
        "00000400 15 n 01 city 0 000 | a large town  \n"
        "00000500 15 n 01 megacity 0 002 @ 00000400 n 0000 @ 00000100 n 0000 | a huge city  \n")
    corpus = load_instruction_corpus(data_cfg(source="wordnet", path=str(tmp_path)))
    pairs = dict(zip(corpus.train.texts + corpus.test.texts,
                     corpus.train.responses + corpus.test.responses))
    assert pairs == {
        "What does the noun 'national capital' mean?": "the capital city of a nation",
        "What are synonyms of the noun 'national capital'?": "capital",
        "What does the noun 'Paris' mean?": "the capital of France",
        "What are synonyms of the noun 'Paris'?": "City of Light",
        "What is the noun 'Paris' an instance of?": "national capital",
        "What does the noun 'city' mean?": "a large town",
        "What does the noun 'megacity' mean?": "a huge city",
        "What is the noun 'megacity' a kind of?": "city"}  # its first hypernym
    assert set(corpus.train.labels) | set(corpus.test.labels) == {15}


def test_a_malformed_wordnet_line_is_named(tmp_path):
    for name in ("data.adj", "data.adv", "data.verb"):
        (tmp_path / name).write_text("")
    (tmp_path / "data.noun").write_text("00000100 15 n 03 only_one_word 0 000 | gloss\n")
    with pytest.raises(DataError, match=r"data.noun:1: not a WordNet synset line"):
        load_instruction_corpus(data_cfg(source="wordnet", path=str(tmp_path)))


def test_quiz_is_refused_for_classification():
    with pytest.raises(Exception, match="'quiz' only with task = 'causal-lm'"):
        parse_run_config({"data.source": "quiz"})


def test_multi_turn_chats_keep_their_context_through_split_subset_and_fingerprint():
    from hfedmoe.fingerprint import corpus_fingerprint

    def chat(i, earlier):
        return {"messages": [{"role": "user", "content": f"u{i}"},
                             {"role": "assistant", "content": earlier},
                             {"role": "user", "content": f"v{i}"},
                             {"role": "assistant", "content": f"b{i}"}]}

    rows = [chat(i, f"a{i}") for i in range(10)]
    corpus = rows_to_instruction_corpus(rows, data_cfg(), "x.jsonl")
    for split in (corpus.train, corpus.test):
        assert len(split.contexts) == len(split)
        for prompt, response, context in zip(split.texts, split.responses, split.contexts):
            i = prompt[1:]
            assert response == f"b{i}" and context == (("user", f"u{i}"), ("assistant", f"a{i}"))
    first = corpus.train.subset([1])
    assert first.contexts == (corpus.train.contexts[1],)
    # the same pairs after a different earlier turn are different examples, with another hash
    changed = rows_to_instruction_corpus([chat(i, f"a{i}" if i else "other") for i in range(10)],
                                         data_cfg(), "x.jsonl")
    assert corpus_fingerprint(changed) != corpus_fingerprint(corpus)
    both = rows_to_instruction_corpus(rows + [chat(0, "other")], data_cfg(), "x.jsonl")
    assert len(both.train) + len(both.test) == 11
    # single-turn data keeps no contexts (and the splits it always had)
    plain = rows_to_instruction_corpus([{"prompt": f"p{i}", "response": "r"} for i in range(5)],
                                       data_cfg(), "x.jsonl")
    assert plain.train.contexts == () and plain.test.contexts == ()


FAQ_EXCERPT = """\
Table of Contents

1. Definitions and overview
    1.1.\u00a0What is this FAQ?

Chapter\u00a01.\u00a0Definitions and overview

1.1.\u00a0What is this FAQ?

    This document gives frequently asked questions (with their
    answers!) about the Debian distribution.

    If you can't find what you're looking for, see Section 12.1.

1.5.\u00a0What is the difference between Debian GNU/Linux and other Linux
distributions? Why should I choose Debian?

    The key features that distinguish Debian
    are its package management.

Chapter\u00a08.\u00a0The Debian package management tools

8.1.1.\u00a0dpkg

    This is the main package management program.

8.2.\u00a0How can I tell what packages are already installed?

    Run dpkg-query --list.
"""


@pytest.mark.parametrize("compressed", [False, True])
def test_debian_faq_questions_get_their_answers_first_paragraph(tmp_path, compressed):
    import gzip

    path = tmp_path / ("faq.txt.gz" if compressed else "faq.txt")
    data = FAQ_EXCERPT.encode("utf-8")
    path.write_bytes(gzip.compress(data) if compressed else data)
    corpus = load_instruction_corpus(data_cfg(source="debian-faq", path=str(path),
                                              test_fraction=0.5))
    pairs = dict(zip(corpus.train.texts + corpus.test.texts,
                     corpus.train.responses + corpus.test.responses))
    groups = dict(zip(corpus.train.texts + corpus.test.texts,
                      [corpus.label_names[g] for g in corpus.train.labels + corpus.test.labels]))
    assert pairs == {  # the table of contents and the heading without a question are not asked
        "What is this FAQ?": "This document gives frequently asked questions (with their "
                             "answers!) about the Debian distribution.",
        "What is the difference between Debian GNU/Linux and other Linux distributions? Why "
        "should I choose Debian?": "The key features that distinguish Debian are its package "
                                   "management.",
        "How can I tell what packages are already installed?": "Run dpkg-query --list."}
    assert groups["What is this FAQ?"] == "Definitions and overview"
    assert groups["How can I tell what packages are already installed?"] == \
        "The Debian package management tools"


def test_debian_faq_missing_or_without_questions_says_so(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install debian-faq"):
        load_instruction_corpus(data_cfg(source="debian-faq", path=str(tmp_path / "none.txt")))
    (tmp_path / "empty.txt").write_text("Chapter\u00a01.\u00a0Nothing\n\nno questions here\n")
    with pytest.raises(DataError, match="no question"):
        load_instruction_corpus(data_cfg(source="debian-faq", path=str(tmp_path / "empty.txt")))
    with pytest.raises(Exception, match="'debian-faq' only with task = 'causal-lm'"):
        parse_run_config({"data.source": "debian-faq"})


@pytest.mark.skipif(not Path("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz").is_file(),
                    reason="debian-faq is not installed (make bench-setup)")
def test_the_installed_debian_faq_gives_its_questions_by_chapter():
    corpus = load_instruction_corpus(data_cfg(source="debian-faq", path=""))
    pairs = dict(zip(corpus.train.texts + corpus.test.texts,
                     corpus.train.responses + corpus.test.responses))
    assert len(pairs) >= 100 and len(corpus.label_names) >= 12
    assert pairs["What is Debian GNU/Linux?"].startswith("Debian GNU/Linux is a particular "
                                                         "distribution of the Linux")
