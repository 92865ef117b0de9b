"""Local data files (data.source = "file") as users have them: encodings, blank lines, CRLF,
nulls, odd labels, empty texts, long fields, bad CSV. Each case writes its bytes explicitly and
checks either what loads or the one-line DataError (file, editor line number, problem)."""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path

import pytest

from hfedmoe.config import ConfigError, parse_run_config
from hfedmoe.data import Corpus, DataError, load_corpus

TEXTS = ("café au lait", "the match ended", "rates rose", "a new phone", "goals galore",
         "bonds fell")
LABELS = ("x", "y", "x", "y", "x", "y")  # 3 per class: one of each goes to test (0.2 * 3)


def config(path: Path, **overrides: object):
    """The run config's data section for ``path`` (overrides by dotted key, e.g. encoding)."""
    keys = {f"data.{key.replace('_', '-')}": value for key, value in overrides.items()}
    return parse_run_config({"data.source": "file", "data.path": str(path), **keys}).data


def write(tmp_path: Path, name: str, raw: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def load(path: Path, **overrides: object) -> Corpus:
    return load_corpus(config(path, **overrides))


def examples(corpus: Corpus) -> dict[str, str]:
    """Every loaded text -> its label name (train and test)."""
    pairs = zip(corpus.train.texts + corpus.test.texts, corpus.train.labels + corpus.test.labels)
    return {text: corpus.label_names[label] for text, label in pairs}


def error(path: Path, line: int | None = None, **overrides: object) -> str:
    """The DataError message of loading ``path``; checks it is one line that names the file
    (and ``line``, as an editor numbers it)."""
    with pytest.raises(DataError) as info:
        load(path, **overrides)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    prefix = f"data.path '{path}'" + (f":{line}: " if line is not None else ": ")
    assert message.startswith(prefix), message
    return message


def csv_text(texts=TEXTS, labels=LABELS, newline: str = "\n") -> str:
    return newline.join(["text,label"] + [f"{t},{y}" for t, y in zip(texts, labels)]) + newline


def jsonl_text(texts=TEXTS, labels=LABELS, newline: str = "\n") -> str:
    rows = [json.dumps({"text": t, "label": y}, ensure_ascii=False) for t, y in zip(texts, labels)]
    return newline.join(rows) + newline


EXPECTED = dict(zip(TEXTS, LABELS))


# --- encodings ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [("x.csv", csv_text()), ("x.jsonl", jsonl_text())])
@pytest.mark.parametrize("encode", [
    lambda s: s.encode("utf-8"),
    lambda s: codecs.BOM_UTF8 + s.encode("utf-8"),
    lambda s: codecs.BOM_UTF16_LE + s.encode("utf-16-le"),  # Excel's "Unicode text"
    lambda s: codecs.BOM_UTF16_BE + s.encode("utf-16-be"),
], ids=["utf8", "utf8-bom", "utf16le-bom", "utf16be-bom"])
def test_utf8_and_byte_order_marked_files_load(tmp_path, name, text, encode):
    path = write(tmp_path, name, encode(text))
    assert examples(load(path)) == EXPECTED
    if encode(text)[:2] != text.encode()[:2]:
        assert examples(load(path, encoding="cp1252")) == EXPECTED  # a byte-order mark wins


def cp1252_csv_with_e9_on_line_41() -> bytes:
    rows = [f"row {i},{'xy'[i % 2]}" for i in range(39)] + ["café crème,x"]
    return "\r\n".join(["text,label"] + rows).encode("cp1252") + b"\r\n"


def test_cp1252_csv_names_line_byte_and_key_then_loads_with_the_key(tmp_path):
    path = write(tmp_path, "sheet.csv", cp1252_csv_with_e9_on_line_41())
    message = error(path, 41)
    assert "byte 0xE9 is not valid utf-8" in message
    assert "--set data.encoding=cp1252" in message
    loaded = examples(load(path, encoding="cp1252"))
    assert loaded["café crème"] == "x" and len(loaded) == 40


def test_latin1_jsonl_names_line_and_byte_then_loads_with_the_key(tmp_path):
    raw = ('{"text": "plain", "label": "a"}\n\n'
           '{"text": "déjà vu", "label": "b"}\n').encode("latin-1")
    path = write(tmp_path, "x.jsonl", raw + jsonl_text().encode("utf-8"))
    message = error(path, 3)
    assert "byte 0xE9" in message and "data.encoding" in message
    # The same bytes declared latin-1 (the ASCII rows read the same in both encodings).
    path = write(tmp_path, "y.jsonl", raw + jsonl_text(texts=[t.replace("é", "e") for t in TEXTS]
                                                       ).encode("latin-1"))
    assert examples(load(path, encoding="latin-1"))["déjà vu"] == "b"


def test_utf16_without_byte_order_mark_is_named_then_loads_with_the_key(tmp_path):
    path = write(tmp_path, "x.csv", csv_text().encode("utf-16-le"))
    message = error(path, 1)
    assert "NUL" in message and "data.encoding=utf-16-le" in message
    assert examples(load(path, encoding="utf-16-le")) == EXPECTED


def test_zip_archive_named_csv_is_named(tmp_path):
    path = write(tmp_path, "book.csv", b"PK\x03\x04" + bytes(range(256)))
    assert "zip archive" in error(path)


@pytest.mark.parametrize("encoding, ok", [
    ("utf-8", True), ("CP1252", True), ("latin-1", True), ("utf-16", True),
    ("nope", False), ("base64", False), ("rot13", False), ("", False)])
def test_data_encoding_is_a_text_codec(encoding, ok):
    if ok:
        assert parse_run_config({"data.encoding": encoding}).data.encoding == encoding
        return
    with pytest.raises(ConfigError) as info:
        parse_run_config({"data.encoding": encoding})
    assert str(info.value).startswith(f"config key 'data.encoding' = {encoding!r} is invalid")


# --- lines: blank, whitespace, CRLF, CR --------------------------------------------------

def jsonl_with_blank_lines(newline: str) -> tuple[str, int]:
    """Rows 1-30 with a blank or whitespace line after every other row, then row 31 with a
    null label: it is on physical line 46."""
    lines = []
    for i in range(30):
        lines.append(json.dumps({"text": f"text {i}", "label": "xy"[i % 2]}))
        if i % 2 == 0:
            lines.append("" if i % 4 else "  \t ")
    lines.append('{"text": "no label", "label": null}')
    return newline.join(lines) + newline, len(lines)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_jsonl_null_label_after_blank_lines_names_the_physical_line(tmp_path, newline):
    text, line = jsonl_with_blank_lines(newline)
    assert line == 46
    path = write(tmp_path, "x.jsonl", text.encode("utf-8"))
    message = error(path, 46)
    assert message.endswith("field 'label' is null")
    assert "missing" not in message and "no field" not in message


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_blank_whitespace_and_empty_records_are_skipped(tmp_path, newline):
    lines = ["", "text,label ", "   "] + [f"{t},{y}" for t, y in zip(TEXTS, LABELS)]
    lines[5:5] = [",", " , ", "\t"]
    path = write(tmp_path, "x.csv", (newline.join(lines) + newline * 3 + "  ").encode("utf-8"))
    assert examples(load(path)) == EXPECTED
    path = write(tmp_path, "x.jsonl", ("\n \n" + jsonl_text(newline=newline) + " \t\n\n")
                 .encode("utf-8"))
    assert examples(load(path)) == EXPECTED


# --- nulls, missing and extra fields ------------------------------------------------------

def test_csv_empty_label_cell_is_named(tmp_path):
    path = write(tmp_path, "x.csv", (csv_text() + "orphan,\r\n").encode("utf-8"))
    assert error(path, 8).endswith("field 'label' is empty")


def test_jsonl_missing_field_says_missing_and_lists_the_fields(tmp_path):
    path = write(tmp_path, "x.jsonl", (jsonl_text() + '\n{"text": "t", "topic": "x"}\n').encode())
    message = error(path, 8)
    assert "field 'label' (data.label-field) is missing; fields: text, topic" in message
    path = write(tmp_path, "y.jsonl", (jsonl_text() + "{}\n").encode())
    assert "field 'text' (data.text-field) is missing; fields: none" in error(path, 7)


def test_extra_fields_are_ignored(tmp_path):
    rows = [json.dumps({"id": i, "text": t, "meta": {"a": [1]}, "label": y, "score": None})
            for i, (t, y) in enumerate(zip(TEXTS, LABELS))]
    path = write(tmp_path, "x.jsonl", "\n".join(rows).encode())
    assert examples(load(path)) == EXPECTED
    lines = ["id,text,notes,label"] + [f"{i},{t},,{y}"
                                       for i, (t, y) in enumerate(zip(TEXTS, LABELS))]
    path = write(tmp_path, "x.csv", "\n".join(lines).encode())
    assert examples(load(path)) == EXPECTED


def test_csv_header_field_named_with_spaces_is_found(tmp_path):
    path = write(tmp_path, "x.csv", csv_text().replace("text,label", " text , label ").encode())
    assert examples(load(path)) == EXPECTED


# --- CSV shape -------------------------------------------------------------------------------

def test_csv_record_with_more_cells_names_the_line(tmp_path):
    path = write(tmp_path, "x.csv", (csv_text() + "hello, world,x\n").encode())
    message = error(path, 8)
    assert "3 cells but the header has 2 columns" in message and "comma" in message


def test_csv_trailing_empty_cells_are_ignored(tmp_path):
    text = "text,label,\n" + "".join(f"{t},{y},,\n" for t, y in zip(TEXTS, LABELS))
    assert examples(load(write(tmp_path, "x.csv", text.encode()))) == EXPECTED


def test_csv_record_with_fewer_cells_names_line_and_column(tmp_path):
    text = "text,label,source\n" + "".join(f"{t},{y},web\n" for t, y in zip(TEXTS, LABELS))
    path = write(tmp_path, "x.csv", (text + "\n\nshort row,x\n").encode())
    message = error(path, 10)
    assert "2 cells but the header has 3 columns; missing: source" in message


def test_csv_quoted_newlines_number_records_by_their_first_line(tmp_path):
    text = ('text,label\n"first line\r\nsecond line\n\nfourth",x\n'
            + csv_text().split("\n", 1)[1] + '"spans\nlines",\n')
    path = write(tmp_path, "x.csv", text.encode())
    assert error(path, 12).endswith("field 'label' is empty")
    path = write(tmp_path, "y.csv", text.rsplit('"spans', 1)[0].encode())
    assert examples(load(path))["first line\nsecond line\n\nfourth"] == "x"


def test_csv_unterminated_quote_names_the_line_it_opens_on(tmp_path):
    path = write(tmp_path, "x.csv", (csv_text() + '"never closed,x\nmore,y\n').encode())
    message = error(path, 8)
    assert "not valid CSV" in message and "quotes" in message


def test_csv_header_only_and_blank_files_hold_no_examples(tmp_path):
    for name, raw in (("a.csv", b"text,label\r\n\r\n"), ("b.csv", b"\n\n"), ("c.jsonl", b"\n \n")):
        assert error(write(tmp_path, name, raw)).endswith("the file holds no examples")


def test_csv_duplicate_column_is_named(tmp_path):
    path = write(tmp_path, "x.csv", csv_text().replace("text,label", "text,label, text").encode())
    assert error(path, 1).endswith("the header names column 'text' twice")


def test_csv_with_semicolons_is_named(tmp_path):
    path = write(tmp_path, "x.csv", csv_text().replace(",", ";").encode())
    message = error(path, 1)
    assert "';'" in message and "comma-separated" in message


def test_csv_very_long_field_loads_and_the_limit_is_restored(tmp_path):
    long_text = "word " * 60_000  # 300,000 characters, over csv's default 131,072
    path = write(tmp_path, "x.csv", (csv_text() + f'"{long_text}",x\n').encode())
    before = csv.field_size_limit()
    assert examples(load(path))[long_text] == "x"
    assert csv.field_size_limit() == before


# --- JSON lines --------------------------------------------------------------------------------

def test_jsonl_invalid_json_and_non_objects_name_the_line(tmp_path):
    path = write(tmp_path, "x.jsonl", (jsonl_text() + '\n{"text": "a" "label": 1}\n').encode())
    assert "not valid JSON (Expecting ',' delimiter at column 14)" in error(path, 8)
    path = write(tmp_path, "y.jsonl", ('\r\n{"text": "a", "label": 1}\r\n[1]\r\n').encode())
    assert error(path, 3).endswith("expected a JSON object, got a list")


# --- label values ------------------------------------------------------------------------------

def test_integral_floats_are_integers_and_string_labels_are_stripped(tmp_path):
    labels = (1, 2.0, 1.0, 2, 1, 2e0)
    path = write(tmp_path, "x.jsonl", jsonl_text(labels=labels).encode())
    corpus = load(path)
    assert corpus.label_names == ("1", "2")
    assert examples(corpus) == dict(zip(TEXTS, ("1", "2") * 3))
    labels = (" x", "y ", "x", "\ty\t", "x", "y")
    path = write(tmp_path, "y.jsonl", jsonl_text(labels=labels).encode())
    assert examples(load(path)) == EXPECTED


@pytest.mark.parametrize("label, problem", [
    ("1.5", "field 'label' is 1.5, not an integer"),
    ("NaN", "field 'label' is nan, not an integer"),
    ("true", "field 'label' is the boolean true"),
    ("[1]", "field 'label' is a list ([1])"),
    ('{"name": "x"}', "field 'label' is an object ({'name': 'x'})"),
    ('"  "', "field 'label' is empty"),
])
def test_odd_labels_name_the_line(tmp_path, label, problem):
    path = write(tmp_path, "x.jsonl", (jsonl_text() + f'\n{{"text": "odd", "label": {label}}}\n')
                 .encode())
    assert problem in error(path, 8)


def test_text_that_is_not_a_string_names_the_line(tmp_path):
    path = write(tmp_path, "x.jsonl", (jsonl_text() + '{"text": 12345, "label": "x"}\n').encode())
    assert "field 'text' is a number (12345), not a string" in error(path, 7)


# --- empty texts ---------------------------------------------------------------------------------

def test_empty_texts_are_dropped_and_reported(tmp_path):
    lines = jsonl_text().splitlines()
    lines.insert(1, '{"text": "", "label": "x"}')
    lines.insert(4, '{"text": "  \\t ", "label": "y"}')
    lines.insert(6, '{"text": null, "label": null}')
    path = write(tmp_path, "x.jsonl", "\n".join(lines).encode())
    corpus = load(path)
    assert examples(corpus) == EXPECTED
    assert corpus.notes == (f"data.path '{path}': dropped 3 rows with an empty text "
                            "(lines 2, 5, 7)",)
    assert load(path, max_examples=4).notes == corpus.notes  # limit_examples keeps them


def test_many_empty_texts_are_listed_to_five_and_csv_cells_count(tmp_path):
    text = csv_text() + "".join(f",{'xy'[i % 2]}\n" for i in range(7)) + '" ",x\n'
    path = write(tmp_path, "x.csv", text.encode())
    corpus = load(path)
    assert examples(corpus) == EXPECTED
    assert corpus.notes == (f"data.path '{path}': dropped 8 rows with an empty text "
                            "(lines 8, 9, 10, 11, 12, ...)",)


def test_only_empty_texts_is_an_error(tmp_path):
    path = write(tmp_path, "x.csv", b"text,label\n,x\n  ,y\n")
    assert error(path).endswith("every text (field 'text') is empty")


def test_hf_rows_with_empty_texts_are_dropped_and_named_by_index():
    import datasets

    from hfedmoe.data.corpora import hf_to_corpus
    train = datasets.Dataset.from_dict({"text": [""] + list(TEXTS) + [None],
                                        "label": ["x"] + list(LABELS) + ["y"]})
    test = datasets.Dataset.from_dict({"text": ["held out", " "], "label": ["y", "x"]})
    cfg = parse_run_config({"data.source": "hf", "data.hf-name": "x"}).data
    corpus = hf_to_corpus(datasets.DatasetDict(train=train, test=test), cfg, "data.hf-name 'x'")
    assert corpus.test.texts == ("held out",) and set(corpus.train.texts) == set(TEXTS)
    assert corpus.notes == ("data.hf-name 'x': dropped 3 rows with an empty text "
                            "(train row 0, train row 7, test row 1)",)
    bad = datasets.Dataset.from_dict({"text": list(TEXTS), "label": ["x", "y"] * 2 + [None, "x"]})
    with pytest.raises(DataError, match=r"^data.hf-name 'x', train row 4: field 'label' is null$"):
        hf_to_corpus(datasets.DatasetDict(train=bad), cfg, "data.hf-name 'x'")


# --- the split column -----------------------------------------------------------------------------

def test_split_values_ignore_case_and_whitespace(tmp_path):
    splits = ("Train", " TEST ", "train", "test", "train\t", "Train")
    text = "text,label,split\n" + "".join(f"{t},{y},{s}\n"
                                         for t, y, s in zip(TEXTS, LABELS, splits))
    corpus = load(write(tmp_path, "x.csv", text.encode()))
    assert set(corpus.test.texts) == {TEXTS[1], TEXTS[3]} and len(corpus.train) == 4


@pytest.mark.parametrize("row, line, problem", [
    ('{"text": "t", "label": "x", "split": null}', 7, "field 'split' is null"),
    ('{"text": "t", "label": "x", "split": "validation"}', 7, "field 'split' is 'validation'"),
    ('{"text": "t", "label": "x", "split": ""}', 7, "field 'split' is empty"),
    ('{"text": "t", "label": "x"}', 7, "field 'split' (other rows have one) is missing"),
])
def test_bad_split_values_name_the_line(tmp_path, row, line, problem):
    rows = [json.dumps({"text": t, "label": y, "split": "train" if i % 3 else "test"})
            for i, (t, y) in enumerate(zip(TEXTS, LABELS))]
    path = write(tmp_path, "x.jsonl", "\n".join(rows + [row]).encode())
    assert problem in error(path, line)
