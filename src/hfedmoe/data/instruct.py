"""Instruction corpora for ``task = "causal-lm"``: (prompt, response) pairs, each in a group.

A corpus is a :class:`~hfedmoe.data.corpora.Corpus` whose datasets hold the prompts in
``texts``, the answers in ``responses`` and a group id in ``labels`` (a topic, a WordNet
lexicographer file, or the single group ``"all"``); the partitioners split by group
(``data.partition = "natural"``: one client per group, :mod:`hfedmoe.data.partition`).

Sources (``data.source``):

* ``file`` - a ``.jsonl`` or ``.csv`` file (same reading rules and one-line errors as the
  classification files, :func:`hfedmoe.data.corpora.load_file`). Each row in one of the common
  shapes, recognised by its fields: ``messages`` (a chat: a list of ``{"role", "content"}``
  with roles ``system``, ``user``, ``assistant``; the last assistant turn is the response, the
  user turn before it the prompt, and the turns before that prompt its context: a multi-turn
  chat is one example whose every assistant turn is learned, hfedmoe.data.instructions; turns
  after the last assistant turn, or between it and its user turn, are not used), Alpaca's
  ``instruction`` (+ optional ``input``, appended after a blank line) and ``output``,
  ``prompt`` and ``response`` (or ``completion``), ``question`` and ``answer``.
  ``data.label-field``, when rows have it, names the group; ``split`` (train/test) as for
  classification.
* ``wordnet`` - WordNet 3.0, three questions about the first sense of each (word, part of
  speech) by file offset: "What does the noun 'bank' mean?" -> the gloss's definition
  (without its quoted examples); "What are synonyms of the noun 'car'?" -> the synset's other
  words ("auto, automobile, machine, motorcar"); "What is the noun 'dog' a kind of?" -> its
  first hypernym's first word ("canine"; an instance: "What is the noun 'Paris' an instance
  of?"; a verb: "What is the verb 'sprint' a way to?" -> "run"); group = lexicographer
  file (45).
* ``quiz`` - the quiz files of the Debian package ``bsdgames`` (33 topics: capitals, elements,
  presidents, Latin, collectives, ...): for a line ``v0:v1:...`` under field names
  ``n0:n1:...`` (the quiz ``index``), "<n0>: <v0>. What is the <nk>?" -> ``vk`` for each
  k >= 1, alternatives resolved to their first, full form (:func:`canonical`); group = topic.
* ``debian-faq`` - the Debian GNU/Linux FAQ (Debian package ``debian-faq``, its plain-text
  edition): each section heading that asks a question (with a "?"; wrapped headings joined)
  -> the first paragraph of its answer, whitespace-normalised (the answers run to several
  paragraphs and lists; the first one is the answer proper); group = chapter (16).
* ``hf`` - a Hugging Face dataset with the same row shapes (network permitting).

Rows whose prompt or response is empty are dropped and reported in ``Corpus.notes``; a
non-string value raises DataError naming the row. Pairs are de-duplicated on (context,
prompt, response) and split like classification texts: ``round(test_fraction * n_g)`` pairs
of each group to test, ranked by a hash of the pair (and its context, when it has one), so
the split depends on the data alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets

from hfedmoe.config import DataConfig
from hfedmoe.data.corpora import (
    SPLIT_COLUMN,
    Corpus,
    DataError,
    TextDataset,
    _at,
    _default_places,
    _kind,
    _label_name,
    _places_text,
    _split_name,
    _is_int,
    limit_examples,
    read_rows,
)

SINGLE_GROUP = "all"
ROLES = ("system", "user", "assistant")  # the chat roles a conversation may use
Context = tuple[tuple[str, str], ...]  # the (role, content) turns before a prompt
QUIZ_FOLDER = Path("/usr/share/games/bsdgames/quiz")
QUIZ_HINT = "install it with `make bench-setup` (or: apt-get install bsdgames)"
FAQ_FILE = Path("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
FAQ_HINT = "install it with `make bench-setup` (or: apt-get install debian-faq)"
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
# row shapes: (prompt fields, response field), tried in this order
SHAPES = ((("instruction", "input"), "output"), (("prompt",), "response"),
          (("prompt",), "completion"), (("question",), "answer"))


def load_instruction_corpus(cfg: DataConfig) -> Corpus:
    """The instruction corpus named by ``cfg.source`` (module docstring), then
    ``data.max-examples`` (stratified by split and group)."""
    loaders: dict[str, Callable[[DataConfig], Corpus]] = {
        "file": load_instruction_file, "wordnet": load_wordnet_instructions,
        "quiz": load_quiz, "debian-faq": load_debian_faq, "hf": load_hf_instructions}
    if cfg.source not in loaders:
        raise DataError(f"data.source {cfg.source!r} has no instruction pairs for task "
                        f"'causal-lm'; expected one of {sorted(loaders)}")
    return limit_examples(loaders[cfg.source](cfg), cfg.max_examples)


# --- rows -> pairs --------------------------------------------------------------------------

def row_pair(row: Mapping[str, Any], at: str) -> tuple[Any, Any, Context]:
    """(prompt, response, context) of one row in a shape of the module docstring (the context:
    a chat's turns before the prompt, else ``()``); DataError if the row has none of them."""
    if "messages" in row:
        return _chat_pair(row["messages"], at)
    for prompt_fields, response_field in SHAPES:
        if prompt_fields[0] in row and response_field in row:
            prompt = row[prompt_fields[0]]
            extra = row.get(prompt_fields[1]) if len(prompt_fields) > 1 else None
            _check_string(prompt, at, prompt_fields[0])
            _check_string(extra, at, prompt_fields[1] if len(prompt_fields) > 1 else "")
            if isinstance(prompt, str) and isinstance(extra, str) and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            return prompt, row[response_field], ()
    raise DataError(f"{at}: no instruction fields; expected 'messages', 'instruction' + "
                    "'output', 'prompt' + 'response' (or 'completion'), or 'question' + "
                    f"'answer'; fields: {', '.join(map(str, row)) or 'none'}")


def _chat_pair(messages: Any, at: str) -> tuple[Any, Any, Context]:
    if not isinstance(messages, list) or not all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{at}: field 'messages' must be a list of objects with 'role' and "
                        "'content'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    user = max((i for i, m in enumerate(messages[:last or 0]) if m["role"] == "user"),
               default=None)
    if last is None or user is None:
        raise DataError(f"{at}: field 'messages' has no user turn followed by an assistant turn")
    context = []
    for turn, message in enumerate(messages[:user], start=1):
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{at}: field 'messages' turn {turn} has role {role!r}; expected "
                            f"one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: field 'messages' turn {turn} has content "
                            f"{_kind(content)}, not a string")
        context.append((role, content))
    return messages[user]["content"], messages[last]["content"], tuple(context)


def _check_string(value: Any, at: str, field: str) -> None:
    if value is not None and not isinstance(value, str):
        raise DataError(f"{at}: field '{field}' is {_kind(value)}, not a string")


def rows_to_instruction_corpus(rows: Sequence[Mapping[str, Any]], cfg: DataConfig, origin: str,
                               lines: Sequence[int] | None = None) -> Corpus:
    """Rows -> corpus: pairs by :func:`row_pair`, group by ``cfg.label_field`` when any row
    has it (then every row must), ``split`` likewise; empty pairs dropped (noted)."""
    places = _default_places(lines, len(rows))
    grouped = any(cfg.label_field in row for row in rows)
    has_split = any(SPLIT_COLUMN in row for row in rows)
    prompts, responses, contexts, groups, splits, dropped = [], [], [], [], [], []
    for row, place in zip(rows, places):
        at = _at(origin, place)
        for field, needed in ((cfg.label_field, grouped), (SPLIT_COLUMN, has_split)):
            if needed and field not in row:
                raise DataError(f"{at}: field '{field}' is missing (other rows have one)")
        prompt, response, context = row_pair(row, at)
        _check_string(prompt, at, "prompt")
        _check_string(response, at, "response")
        if not (prompt or "").strip() or not (response or "").strip():
            dropped.append(place)
            continue
        prompts.append(prompt)
        responses.append(response)
        contexts.append(context)
        groups.append(_label_name(row[cfg.label_field], at, cfg.label_field) if grouped
                      else SINGLE_GROUP)
        splits.append(_split_name(row[SPLIT_COLUMN], at) if has_split else None)
    if not prompts:
        raise DataError(f"{origin}: every row has an empty prompt or response")
    ids, names = group_ids(groups)
    rows_ = list(zip(prompts, responses, ids, contexts))
    corpus = (split_pairs(prompts, responses, ids, names, cfg.test_fraction, contexts)
              if not has_split
              else _corpus([r for r, s in zip(rows_, splits) if s == "train"],
                           [r for r, s in zip(rows_, splits) if s == "test"], names))
    notes = (f"{origin}: dropped {len(dropped)} row{'s' if len(dropped) > 1 else ''} with an "
             f"empty prompt or response ({_places_text(dropped)})",) if dropped else ()
    return dataclasses.replace(corpus, notes=notes)


def group_ids(names: Sequence[str]) -> tuple[list[int], tuple[str, ...]]:
    """Group names -> (ids, sorted unique names), numerically sorted when all are integers."""
    unique = set(names)
    ordered = tuple(sorted(unique, key=int if all(_is_int(n) for n in unique) else str))
    index = {name: i for i, name in enumerate(ordered)}
    return [index[n] for n in names], ordered


def _pair_key(prompt: str, response: str, context: Context = ()) -> tuple[bytes, str, str]:
    text = f"{prompt}\x00{response}"
    if context:  # single-turn pairs keep the keys (and splits) they always had
        text += "".join(f"\x00{role}\x00{content}" for role, content in context)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return digest, prompt, response


def split_pairs(prompts: Sequence[str], responses: Sequence[str], groups: Sequence[int],
                group_names: tuple[str, ...], test_fraction: float,
                contexts: Sequence[Context] | None = None) -> Corpus:
    """De-duplicate (context, prompt, response) examples (first group wins), then send
    ``round(test_fraction * n_g)`` of each group g to test, ranked by a hash of the pair and
    its context: the split depends on the data alone. Both splits are ordered by that hash."""
    contexts = contexts if contexts is not None else [()] * len(prompts)
    first: dict[tuple[str, str, Context], int] = {}
    for prompt, response, group, context in zip(prompts, responses, groups, contexts):
        first.setdefault((prompt, response, context), group)
    per_group: list[list[tuple[str, str, Context]]] = [[] for _ in group_names]
    for example, group in first.items():
        per_group[group].append(example)
    train, test = [], []
    for group, members in enumerate(per_group):
        members.sort(key=lambda example: _pair_key(*example))
        num_test = math.floor(test_fraction * len(members) + 0.5)
        test += [(p, r, group, c) for p, r, c in members[:num_test]]
        train += [(p, r, group, c) for p, r, c in members[num_test:]]
    return _corpus(train, test, group_names)


def _corpus(train: list[tuple[str, str, int, Context]], test: list[tuple[str, str, int, Context]],
            names: tuple[str, ...]) -> Corpus:
    """rows (prompt, response, group id, context) -> a corpus, each split ordered by hash."""
    for name, rows in (("train", train), ("test", test)):
        if not rows:
            raise DataError(f"the {name} split is empty; adjust data.test-fraction or the data")
    datasets_ = []
    for rows in (train, test):
        rows = sorted(rows, key=lambda row: _pair_key(row[0], row[1], row[3]))
        multi_turn = any(row[3] for row in rows)
        datasets_.append(TextDataset(tuple(r[0] for r in rows), tuple(r[2] for r in rows), names,
                                     tuple(r[1] for r in rows),
                                     tuple(r[3] for r in rows) if multi_turn else ()))
    return Corpus(datasets_[0], datasets_[1], names)


# --- sources --------------------------------------------------------------------------------

def load_instruction_file(cfg: DataConfig) -> Corpus:
    """A ``.jsonl``/``.csv`` instruction file (module docstring)."""
    rows, lines, origin = read_rows(cfg)
    return rows_to_instruction_corpus(rows, cfg, origin, lines)


def load_hf_instructions(cfg: DataConfig) -> Corpus:
    """``datasets.load_dataset(cfg.hf_name)``'s train (+ test) rows (module docstring)."""
    origin = f"data.hf-name '{cfg.hf_name}'"
    try:
        loaded = datasets.load_dataset(cfg.hf_name)
    except Exception as exc:  # the hub raises many types
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DataError(f"{origin}: the dataset could not be loaded ({reason})") from exc
    if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
        raise DataError(f"{origin}: no 'train' split")
    rows, places = [], []
    for name in ("train", "test"):
        if name in loaded:
            for i, row in enumerate(loaded[name]):
                rows.append({**row, SPLIT_COLUMN: name} if "test" in loaded else row)
                places.append(f"{name} row {i}")
    return rows_to_instruction_corpus(rows, cfg, origin, places)


def load_wordnet_instructions(cfg: DataConfig) -> Corpus:
    """WordNet 3.0 as instructions (module docstring): per synset, for its first word when
    that (word, part of speech) was not asked about by an earlier synset (the first sense,
    by file offset), its definition, its synonyms (the synset's other words, when it has
    some) and what it is a kind of (nouns: the first ``@`` hypernym pointer, or an
    instance's ``@i``; verbs: the first ``@`` pointer, "a way to"); group = the synset's
    lexicographer file. Raises DataError naming the file and line of a malformed line."""
    from hfedmoe.data.wordnet import DATA_FILES, LEXNAMES, wordnet_folder

    folder = wordnet_folder(cfg.path)
    synsets = []  # (file position, pos, lexfile, words, hypernym (kind, pos, offset), gloss)
    first_word: dict[tuple[str, int], str] = {}  # (pos file letter, offset) -> first word
    for name in DATA_FILES:
        with (folder / name).open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.startswith("  ") or not line.strip():
                    continue
                synset = _wordnet_synset(line)
                if synset is None:
                    raise DataError(f"{folder / name}:{number}: not a WordNet synset line")
                offset, lexfile, pos, words, hypernym, gloss = synset
                if lexfile >= len(LEXNAMES):
                    raise DataError(f"{folder / name}:{number}: not a WordNet synset line")
                first_word[(_POS_FILE[pos], offset)] = words[0]
                synsets.append((pos, lexfile, words, hypernym, gloss))
    seen: set[str] = set()
    prompts, responses, groups = [], [], []

    def ask(prompt: str, response: str, group: int) -> None:
        if prompt not in seen and response:
            seen.add(prompt)
            prompts.append(prompt)
            responses.append(response)
            groups.append(group)

    for pos, lexfile, words, hypernym, gloss in synsets:
        word, pos_name = words[0], POS_NAMES.get(pos, "word")
        if f"What does the {pos_name} '{word}' mean?" in seen:
            continue  # a later sense of a word already asked about
        ask(f"What does the {pos_name} '{word}' mean?",
            " ".join(gloss.split('; "')[0].split()).strip(), lexfile)
        others = [w for w in dict.fromkeys(words[1:]) if w.lower() != word.lower()]
        if others:
            ask(f"What are synonyms of the {pos_name} '{word}'?", ", ".join(others), lexfile)
        if hypernym is not None:
            kind, target_pos, offset = hypernym
            target = first_word.get((target_pos, offset))
            if target is not None:
                relation = {"@": "a kind of", "@i": "an instance of"}[kind]
                if pos == "v":
                    relation = "a way to"
                ask(f"What is the {pos_name} '{word}' {relation}?", target, lexfile)
    return split_pairs(prompts, responses, groups, LEXNAMES, cfg.test_fraction)


_POS_FILE = {"n": "n", "v": "v", "a": "a", "s": "a", "r": "r"}  # satellites live in data.adj


def _wordnet_synset(line: str):
    """One ``data.*`` synset line -> (offset, lexfile, ss_type, words, first hypernym
    pointer (symbol "@" or "@i", target pos file letter, offset) or None, gloss); None when
    the line does not have WordNet's layout
    (``offset lex_filenum ss_type w_cnt [word lex_id]... p_cnt [ptr offset pos st]... | gloss``;
    w_cnt is hexadecimal, p_cnt decimal)."""
    head, bar, gloss = line.partition(" | ")
    fields = head.split()
    try:
        if not bar or not fields[0].isdigit() or not fields[1].isdigit():
            return None
        count = int(fields[3], 16)
        words = [_wordnet_word(w) for w in fields[4: 4 + 2 * count: 2]]
        at = 4 + 2 * count
        pointers = int(fields[at])
        hypernym = None
        for i in range(pointers):
            symbol, offset, pos = fields[at + 1 + 4 * i: at + 4 + 4 * i]
            if symbol in ("@", "@i") and hypernym is None:
                hypernym = (symbol, _POS_FILE.get(pos, pos), int(offset))
    except (IndexError, ValueError):
        return None
    if len(words) != count or not count or any(not w for w in words):
        return None
    return int(fields[0]), int(fields[1]), fields[2], words, hypernym, gloss


def _wordnet_word(raw: str) -> str:
    """A lemma as written in data.*: underscores as spaces, without an adjective marker."""
    return re.sub(r"\([a-z]+\)$", "", raw.replace("_", " "))


def quiz_folder(cfg: DataConfig) -> Path:
    """``data.path`` as the quiz folder ("" = /usr/share/games/bsdgames/quiz)."""
    return Path(cfg.path) if cfg.path else QUIZ_FOLDER


def faq_file(cfg: DataConfig) -> Path:
    """``data.path`` as the Debian FAQ's text ("" = the debian-faq package's)."""
    return Path(cfg.path) if cfg.path else FAQ_FILE


def load_quiz(cfg: DataConfig) -> Corpus:
    """The bsdgames quizzes as instructions (module docstring); ``data.path``: the quiz
    folder ("" = /usr/share/games/bsdgames/quiz)."""
    folder = quiz_folder(cfg)
    index = folder / "index"
    if not index.is_file():
        raise DataError(f"data.source 'quiz': '{index}' does not exist; {QUIZ_HINT}, or set "
                        "data.path to the folder holding the quiz files")
    prompts, responses, groups, topics = [], [], [], []
    for entry in _joined_lines(index.read_text(encoding="utf-8", errors="replace")):
        path, _, spec = entry.partition(":")
        topic = Path(path).name
        names = [canonical(n) for n in _fields(spec)]
        file = folder / topic
        if not file.is_file() or len(names) < 2:
            continue
        topics.append(topic)
        for line in _joined_lines(file.read_text(encoding="utf-8", errors="replace")):
            values = [canonical(v) for v in _fields(line)]
            if not values or not values[0]:
                continue
            for k in range(1, min(len(names), len(values))):
                if values[k]:
                    prompts.append(f"{names[0]}: {values[0]}. What is the {names[k]}?")
                    responses.append(values[k])
                    groups.append(topic)
    if not prompts:
        raise DataError(f"data.source 'quiz': no question in '{folder}'")
    ids, names = group_ids(groups)
    return split_pairs(prompts, responses, ids, names, cfg.test_fraction)


def load_debian_faq(cfg: DataConfig) -> Corpus:
    """The Debian FAQ as instructions (module docstring); ``data.path``: its plain-text file
    (``.txt`` or ``.txt.gz``; "" = /usr/share/doc/debian/FAQ/debian-faq.en.txt.gz). Raises
    DataError when the file is missing or holds no question."""
    import gzip

    path = faq_file(cfg)
    if not path.is_file():
        raise DataError(f"data.source 'debian-faq': '{path}' does not exist; {FAQ_HINT}, or "
                        "set data.path to the FAQ's plain-text file")
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8", "replace")
    prompts, responses, groups, chapters = [], [], [], []
    heading: list[str] | None = None  # the lines of the heading being read
    answer: list[list[str]] = []  # its answer's paragraphs so far

    def close() -> None:
        question = " ".join(" ".join(heading).split()) if heading else ""
        first = " ".join(" ".join(answer[0]).split()) if answer else ""
        if "?" in question and first and chapters:
            prompts.append(question)
            responses.append(first)
            groups.append(chapters[-1])

    lines = text.splitlines()
    for number, line in enumerate(lines):
        chapter = _FAQ_CHAPTER.match(line)
        section = _FAQ_SECTION.match(line)
        if chapter or section:
            close()
            heading, answer = None, []
            if chapter:
                chapters.append(" ".join(chapter.group(2).split()))
            else:
                heading = [section.group(2)]
        elif heading is not None and not answer and line[:1].strip():
            heading.append(line)  # a wrapped heading goes on at column 0
        elif heading is not None and line.strip():
            if not answer or not lines[number - 1].strip():
                answer.append([])
            answer[-1].append(line)
    close()
    if not prompts:
        raise DataError(f"data.source 'debian-faq': no question in '{path}'")
    ids, names = group_ids(groups)
    return split_pairs(prompts, responses, ids, names, cfg.test_fraction)


# the FAQ's headings: "Chapter 1. Definitions and overview", "1.2. What is Debian GNU/Linux?"
# (the separators are no-break spaces; the table of contents is indented, so never matches)
_FAQ_CHAPTER = re.compile(r"^Chapter\s+(\d+)\.\s+(\S.*)$")
_FAQ_SECTION = re.compile(r"^(\d+(?:\.\d+)+)\.\s+(\S.*)$")


def _joined_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, blank ones dropped."""
    return [line for line in text.replace("\\\n", "").splitlines() if line.strip()]


def _fields(line: str) -> list[str]:
    """``line`` split at the colons outside braces and brackets."""
    fields, depth, current = [], 0, ""
    for char in line:
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        if char == ":" and depth == 0:
            fields.append(current)
            current = ""
        else:
            current += char
    return fields + [current]


def canonical(value: str) -> str:
    """A quiz value's full form: optional parts ``{x}`` kept (except parenthesised notes such
    as ``{(odd nos.)}``, dropped), the first of ``[a|b]`` and of top-level ``a|b``
    alternatives; whitespace normalised."""
    value = re.sub(r"\{\([^{}]*\)\}", "", value)
    while True:  # innermost groups first
        match = re.search(r"[{\[]([^{}\[\]]*)[}\]]", value)
        if match is None:
            break
        inner = match.group(1).split("|")[0]
        value = value[:match.start()] + inner + value[match.end():]
    return " ".join(value.split("|")[0].split())
