"""The classifier a run leaves behind (``<out>/final-model/``) and how to load it again.

A classification model is an MoE backbone with masked-mean pooling and a linear head
(:class:`~hfedmoe.model.classifier.MoEClassifier`), which no stock transformers class computes
(``*ForSequenceClassification`` pools the last token), so it is saved in hfedmoe's format:

* ``model.safetensors`` - every tensor of the classifier by its own parameter name
  (``backbone.…``, ``classifier.weight``, ``classifier.bias``), float32;
* ``hfedmoe-model.json`` - ``{"format": 1, "task": "classification", "model": {the model.*
  config keys}, "seed": int, "labels": [class names in id order]}``: the model is rebuilt
  with :func:`hfedmoe.model.load_adapter` (the same architecture, expert conversion included)
  and the tensors are loaded over it;
* the tokenizer's files (``AutoTokenizer.from_pretrained(folder)`` loads them).

Causal language models are exported as stock transformers folders instead
(:func:`hfedmoe.model.causal_lm.export_causal_lm`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from hfedmoe.config import ModelConfig
from hfedmoe.model.generic import ModelAdapter

MANIFEST = "hfedmoe-model.json"
WEIGHTS = "model.safetensors"
FORMAT = 1


def export_classifier(adapter: ModelAdapter, tokenizer: Any, folder: Path,
                      model_cfg: ModelConfig, seed: int, labels: Sequence[str]) -> Path:
    """Write the classifier to ``folder`` (module docstring); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
             for k, v in adapter.model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    manifest = {"format": FORMAT, "task": "classification",
                "model": dataclasses.asdict(model_cfg) | {"device": "cpu"}, "seed": seed,
                "labels": list(labels)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(folder)
    return folder


def load_classifier(folder: Path) -> tuple[ModelAdapter, Any, list[str]]:
    """(adapter, tokenizer, label names) of a folder written by :func:`export_classifier`;
    ValueError (one line) when the folder is not one."""
    from hfedmoe.model.loading import load_adapter

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"'{folder}' holds no {MANIFEST}: not a classifier exported by hfedmoe")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("task") != "classification":
        raise ValueError(f"'{path}': format {manifest.get('format')!r}, task "
                         f"{manifest.get('task')!r}; expected format {FORMAT}, classification")
    model_cfg = ModelConfig(**manifest["model"])
    labels = list(manifest["labels"])
    adapter = load_adapter(model_cfg, num_labels=len(labels), seed=int(manifest["seed"]))
    adapter.model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)), strict=True)
    adapter.model.eval()
    return adapter, AutoTokenizer.from_pretrained(folder), labels
