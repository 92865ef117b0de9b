"""WordNet 3.0 glosses labelled with their lexicographer file (45 classes: noun.animal, ...).

The data comes from the Debian package ``wordnet-base`` (``make bench-setup``), never from the
network. Each synset line of ``data.{adj,adv,noun,verb}`` reads

    offset lex_filenum ss_type w_cnt word lex_id ... p_cnt pointers ... | gloss

(``lex_filenum``: two decimal digits, an index into :data:`LEXNAMES`). Header lines (the
licence) start with two spaces. The example text is the gloss alone — the definition and its
quoted usage examples, whitespace-normalised — without the synset's lemmas, which would often
name the class outright (``dog`` -> noun.animal); label id = ``lex_filenum``, so ids are stable.
"""

from __future__ import annotations

from pathlib import Path

from hfedmoe.config import DataConfig
from hfedmoe.data.corpora import Corpus, DataError, split_by_hash

DEFAULT_FOLDER = Path("/usr/share/wordnet")
DATA_FILES = ("data.adj", "data.adv", "data.noun", "data.verb")  # read in this order
INSTALL_HINT = "install it with `make bench-setup` (or: apt-get install wordnet-base)"

# WordNet's ``lexnames`` file (not shipped by wordnet-base): lexicographer file number -> name.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)


def wordnet_folder(path: str) -> Path:
    """``data.path`` as the WordNet dict folder (``""`` = /usr/share/wordnet), checked."""
    folder = Path(path) if path else DEFAULT_FOLDER
    missing = [name for name in DATA_FILES if not (folder / name).is_file()]
    if missing:
        what = "does not exist" if not folder.is_dir() else f"has no {', '.join(missing)}"
        raise DataError(f"data.source 'wordnet': the WordNet folder '{folder}' {what}; "
                        f"{INSTALL_HINT}, or set data.path to the folder holding data.noun")
    lexnames = folder / "lexnames"  # lines "00<TAB>adj.all<TAB>3"; shipped by some packagings
    if lexnames.is_file():
        listed = tuple(line.split()[1] for line in lexnames.read_text().splitlines()
                       if len(line.split()) > 1)
        if listed != LEXNAMES:
            raise DataError(f"'{lexnames}' does not list WordNet 3.0's 45 lexicographer files "
                            "in order; only WordNet 3.0 is supported")
    return folder


def parse_synset_line(line: str, origin: str) -> tuple[int, str] | None:
    """One line of a ``data.*`` file -> (lexname id, gloss), or None for a header line."""
    if line.startswith("  ") or not line.strip():
        return None
    head, bar, gloss = line.partition(" | ")
    fields = head.split()
    if not bar or len(fields) < 4 or not fields[1].isdigit():
        raise DataError(f"{origin}: not a WordNet synset line (expected "
                        "'offset lex_filenum ss_type ... | gloss')")
    lexname_id = int(fields[1])
    if lexname_id >= len(LEXNAMES):
        raise DataError(f"{origin}: lex_filenum {fields[1]} is not in [00, {len(LEXNAMES) - 1}]")
    text = " ".join(gloss.split())
    if not text:
        raise DataError(f"{origin}: the gloss is empty")
    return lexname_id, text


def read_glosses(folder: Path) -> tuple[list[str], list[int]]:
    """Every synset's gloss and lexname id, file by file in :data:`DATA_FILES` order."""
    texts: list[str] = []
    labels: list[int] = []
    for name in DATA_FILES:
        with (folder / name).open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                parsed = parse_synset_line(line, f"{folder / name}:{number}")
                if parsed is not None:
                    labels.append(parsed[0])
                    texts.append(parsed[1])
    if not texts:
        raise DataError(f"data.source 'wordnet': the folder '{folder}' holds no synset lines")
    return texts, labels


def load_wordnet(cfg: DataConfig) -> Corpus:
    """117,659 glosses in 45 classes (WordNet 3.0); 117,033 after de-duplication.

    Identical glosses keep the label of their first occurrence. Label names are all 45
    lexnames even when ``data.path`` holds a subset (a class may have no examples). The
    smallest classes are noun.motive (42 glosses), noun.Tops (51) and adj.ppl (60): every
    class has test examples, and keeps >= 1 train and >= 1 test example under
    ``data.max-examples``; Dirichlet partitions may give a client none of a class.
    """
    texts, labels = read_glosses(wordnet_folder(cfg.path))
    return split_by_hash(texts, labels, LEXNAMES, cfg.test_fraction)
