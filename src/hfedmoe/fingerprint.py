"""Content fingerprints of a run's inputs: what reuse and resume are keyed on.

A finished run that ``hfedmoe compare`` reuses, and a checkpoint that ``hfedmoe run --resume``
continues, must have been made from the same inputs, not only from the same configuration
text: a data file overwritten in place, or a model folder replaced, changes the run without
changing ``config.toml``. Each run therefore records :func:`input_fingerprints` in
``<out>/inputs.json`` and in its checkpoints; a mismatch re-runs (compare) or refuses (resume).

Fingerprints (hex SHA-256, 16 characters shown in messages):

- ``data``: the corpus as loaded (train and test texts, labels, label names, responses), so it covers
  every source (a file, BBC News, WordNet, a Hugging Face dataset) and every option that
  changes what is trained on (``data.max-examples``, ``data.test-fraction``, dropped rows);
- ``model``: for ``smollm2-moe``, its cached conversion's name (the SHA-256 of the GGUF file,
  the transformers version, the conversion version, experts and top-k); for a local folder
  (and the embedded ``minilm-moe``'s package folder), the
  names, sizes and contents of its files; for ``tiny:<family>`` the family and the
  transformers version that builds it; for a Hub id the id and the cached snapshot folder's
  files when there is one (offline), else the id alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

from hfedmoe.config import ModelConfig
from hfedmoe.data.corpora import Corpus

_CHUNK_BYTES = 1 << 20


def corpus_fingerprint(corpus: Corpus) -> str:
    """SHA-256 of the corpus content: label names, then each split's (label, text) rows and,
    for instruction data, their responses (and the earlier turns of multi-turn chats)."""
    digest = hashlib.sha256()
    _feed(digest, "labels", *corpus.label_names)
    for name, split in (("train", corpus.train), ("test", corpus.test)):
        _feed(digest, name, str(len(split)))
        for text, label in zip(split.texts, split.labels):
            _feed(digest, str(label), text)
        if split.responses:
            _feed(digest, "responses", *split.responses)
        if split.contexts:  # multi-turn chats: the earlier turns too
            _feed(digest, "contexts", *(f"{role}\x00{content}" for context in split.contexts
                                        for role, content in context + (("end", ""),)))
    return digest.hexdigest()


def model_fingerprint(model_cfg: ModelConfig) -> str:
    """SHA-256 identifying the model's weights and tokenizer (see the module docstring)."""
    from hfedmoe.model.loading import MINILM_MOE, TINY_PREFIX
    from hfedmoe.model.smollm2 import SMOLLM2_MOE

    digest = hashlib.sha256()
    name = model_cfg.name
    if name.startswith(TINY_PREFIX):
        import transformers

        _feed(digest, name, transformers.__version__)
        return digest.hexdigest()
    folder = Path(name)
    if name == SMOLLM2_MOE:  # the upcycled folder: its name holds the GGUF's fingerprint
        from hfedmoe.model.loading import model_folder

        folder = Path(model_folder(model_cfg))
        _feed(digest, folder.name)
        return digest.hexdigest()
    if name == MINILM_MOE:
        from hfedmoe.model.minilm import minilm_model_dir

        folder = minilm_model_dir()
    elif not folder.is_dir():
        folder = _cached_snapshot(name) or folder
    _feed(digest, name)
    if folder.is_dir():
        _feed_folder(digest, folder)
    return digest.hexdigest()


def input_fingerprints(corpus: Corpus, model_cfg: ModelConfig) -> dict[str, str]:
    """``{"data": ..., "model": ...}`` of a run (recorded in ``inputs.json``)."""
    return {"data": corpus_fingerprint(corpus), "model": model_fingerprint(model_cfg)}


def first_difference(recorded: Mapping[str, str], current: Mapping[str, str]) -> str | None:
    """A phrase naming the first input whose fingerprint differs (None: all equal).

    A recorded mapping that lacks an input counts as different (an older run)."""
    for key in sorted(current):
        if recorded.get(key) != current[key]:
            before = str(recorded.get(key) or "none")[:16]
            return f"the {key} changed (fingerprint {before} then, {current[key][:16]} now)"
    return None


def _feed(digest: "hashlib._Hash", *parts: str) -> None:
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)


def _feed_folder(digest: "hashlib._Hash", folder: Path) -> None:
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if relative.startswith(".") or "/." in relative:  # .git, .cache, lock files
            continue
        _feed(digest, relative, str(file.stat().st_size))
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK_BYTES):
                digest.update(chunk)


def _cached_snapshot(model_id: str) -> Path | None:
    """The offline cache's snapshot folder of a Hub id, or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached, malformed id, hub library errors: fall back to the id
        return None
