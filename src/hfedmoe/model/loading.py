"""Build a :class:`ModelAdapter` (and its tokenizer) from ``model.name``.

``model.name`` is one of

* ``"minilm-moe"`` - the embedded default: all-MiniLM-L6-v2 upcycled to ``model.num-experts``
  experts per FFN, ``model.top-k`` per token (``hfedmoe.model.minilm``);
* ``"tiny:<family>"`` - a ~2M-parameter random model of a supported family (the family's
  own geometry: 2 MoE layers x 8 experts, top-2; Switch top-1), MiniLM's vocabulary;
* a local directory or a Hugging Face id (offline cache only) of a supported family, loaded
  with the family's base model class in float32.

Determinism contract: every process that calls :func:`load_adapter` with the same
arguments gets bit-identical weights - random weights and the classifier head are drawn
from ``seed`` on a forked RNG (the caller's RNG state is untouched). The model is returned
in eval mode on ``model.device``.
"""

from __future__ import annotations

import copy
import difflib
import functools
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterator

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from hfedmoe.config import ConfigError, ModelConfig
from hfedmoe.model import hf_moe, switch
from hfedmoe.model.classifier import MoEClassifier
from hfedmoe.model.generic import ModelAdapter, RoutingFn, UnsupportedModelError
from hfedmoe.model.sparse_experts import SparseExperts

MINILM_MOE = "minilm-moe"
TINY_PREFIX = "tiny:"
PROBE_SENTENCE = "The quick brown fox jumps over the lazy dog. "
# hfedmoe.runner sets HF_HUB_OFFLINE=1 unless the user set it (README, "Models")
OFFLINE_HINT = ("; hfedmoe runs offline unless HF_HUB_OFFLINE=0 is set, see the README's "
                "'Models'")


class ModelNotFoundError(ValueError):
    """``model.name`` is neither a local directory nor available offline; one-line message."""


@dataclass(frozen=True)
class FamilySpec:
    """What loading needs to know about one transformers MoE family."""

    base_model: type[transformers.PreTrainedModel]  # returns ``last_hidden_state``
    convert: Callable[[nn.Module], tuple[list[SparseExperts], list[nn.Module]]]  # in place
    routing: Callable[[PretrainedConfig], RoutingFn]  # the config's router probabilities
    top_k: Callable[[PretrainedConfig], int]
    tiny_config: Callable[[str], PretrainedConfig]
    dropout_keys: tuple[str, ...]  # config attributes set to ``model.dropout``


FAMILIES: MappingProxyType[str, FamilySpec] = MappingProxyType({
    **{family: FamilySpec(hf_moe.BASE_MODELS[family], hf_moe.convert_fused_experts,
                          functools.partial(hf_moe.routing_function, family), hf_moe.top_k,
                          hf_moe.tiny_config,
                          hf_moe.DROPOUT_KEYS)
       for family in hf_moe.FUSED_FAMILIES},
    switch.FAMILY: FamilySpec(switch.BASE_MODEL, switch.convert_switch_experts,
                              lambda config: switch.switch_routing, switch.top_k,
                              switch.tiny_config,
                              switch.DROPOUT_KEYS),
})
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(FAMILIES)


# Families recognised by structure (hf_moe.moe_blocks) and tested on tiny configs as
# classifiers and causal LMs (tests/unit/test_more_families.py); the README lists them.
TESTED_STRUCTURAL_FAMILIES = ("granitemoe", "granitemoeshared", "phimoe", "qwen3_next",
                              "qwen3_5_moe_text", "ernie4_5_moe", "glm4_moe", "hunyuan_v1_moe",
                              "minimax", "minimax_m2", "deepseek_v2", "afmoe", "cohere2_moe",
                              "flex_olmo", "exaone_moe", "solar_open", "dots1", "lfm2_moe",
                              "glm4_moe_lite", "gpt_oss")


def unsupported(family: str, reason: str) -> UnsupportedModelError:
    """The one-line error for a model of ``family`` that hfedmoe cannot convert."""
    from hfedmoe.model.smollm2 import SMOLLM2_MOE

    known = SUPPORTED_FAMILIES + TESTED_STRUCTURAL_FAMILIES
    hint = difflib.get_close_matches(family, known, n=1) if family not in known else []
    suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
    return UnsupportedModelError(
        f"model_type '{family}' is not supported: {reason}{suggestion}; supported families: "
        f"{', '.join(known)}, or any transformers "
        f"family with the standard fused MoE block (or the built-in '{MINILM_MOE}' and "
        f"'{SMOLLM2_MOE}')")


def converted(spec: FamilySpec, backbone: nn.Module, family: str
              ) -> tuple[list[SparseExperts], list[nn.Module]]:
    """``spec.convert(backbone)`` (in place), its errors as :func:`unsupported`."""
    try:
        return spec.convert(backbone)
    except UnsupportedModelError as exc:
        raise unsupported(family, str(exc)) from None


def check_structure(config: PretrainedConfig) -> None:
    """Raise :func:`unsupported` unless a model of ``config`` converts: the family's base model
    is built on the meta device (no memory, no weights) and converted."""
    family = config.model_type
    spec = family_spec(family)
    with torch.device("meta"):
        backbone = spec.base_model(copy.deepcopy(config))
    converted(spec, backbone, family)


def family_spec(family: str) -> FamilySpec:
    """The spec of ``family`` (a transformers ``model_type``): a family of :data:`FAMILIES`, or
    any decoder family transformers knows, whose MoE blocks are then recognised by structure
    when the model is converted (UnsupportedModelError, one line, if it has none).
    UnsupportedModelError for a model_type transformers does not know."""
    if family in FAMILIES:
        return FAMILIES[family]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        base_model = MODEL_MAPPING[CONFIG_MAPPING[family]]
    except KeyError:
        raise unsupported(family, f"transformers {transformers.__version__} has no base model "
                                  "of that name") from None
    return FamilySpec(base_model, hf_moe.convert_fused_experts,
                      functools.partial(hf_moe.routing_function, family), hf_moe.top_k,
                      hf_moe.generic_tiny_config, ("attention_dropout",))


def load_adapter(model_cfg: ModelConfig, num_labels: int, seed: int,
                 head: str = "classifier") -> ModelAdapter:
    """The adapter for ``model_cfg.name`` (see the module docstring) with a ``head``:
    ``"classifier"`` (:class:`MoEClassifier`, ``num_labels`` classes) or ``"causal-lm"``
    (:class:`hfedmoe.model.causal_lm.MoECausalLM`, the model's own LM head; decoder families
    with fused experts only, else UnsupportedModelError)."""
    name = model_cfg.name
    if head == "causal-lm":
        adapter = _causal_lm_adapter(model_cfg, seed)
    elif head != "classifier":
        raise ValueError(f"head must be 'classifier' or 'causal-lm', got {head!r}")
    elif name == MINILM_MOE:
        adapter = _minilm_adapter(model_cfg, num_labels, seed)
    elif name.startswith(TINY_PREFIX):
        family = name[len(TINY_PREFIX):]
        backbone = tiny_backbone(family, seed, model_cfg.dropout)
        adapter = adapter_from_backbone(backbone, family, num_labels, seed)
    else:
        backbone = pretrained_backbone(model_folder(model_cfg), model_cfg.dropout)
        adapter = adapter_from_backbone(backbone, backbone.config.model_type, num_labels, seed)
    adapter.model.to(model_cfg.device).eval()
    adapter.model.autocast_dtype = autocast_dtype(model_cfg.precision, model_cfg.device)
    return adapter


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype of ``model.precision`` on ``device``: bfloat16 for ``"bf16-mixed"``
    (and for ``"auto"`` on a CUDA device that supports it), else None (plain float32). The
    weights, their gradients and the optimizer state stay float32 either way."""
    if precision == "bf16-mixed":
        return torch.bfloat16
    if precision == "auto" and device.startswith("cuda") and torch.cuda.is_available() \
            and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def model_folder(model_cfg: ModelConfig) -> str:
    """Where a pretrained ``model.name`` loads from: a local folder or Hub id as given; for
    ``smollm2-moe`` the cached upcycled folder of ``model.num-experts`` and ``model.top-k``
    (hfedmoe.model.smollm2; made on first use, ~1 minute). Raises ModelNotFoundError."""
    from hfedmoe.model.smollm2 import SMOLLM2_MOE, SmolLM2Unavailable, moe_folder

    if model_cfg.name != SMOLLM2_MOE:
        return model_cfg.name
    try:
        return str(moe_folder(model_cfg.num_experts, model_cfg.top_k))
    except (SmolLM2Unavailable, ValueError) as exc:
        raise ModelNotFoundError(str(exc)) from None


def tiny_backbone(family: str, seed: int, dropout: float = 0.0) -> transformers.PreTrainedModel:
    """The family's unconverted random tiny base model, weights drawn from ``seed``."""
    spec = family_spec(family)
    config = spec.tiny_config(family)
    _set_dropout(config, spec.dropout_keys, dropout)
    with seeded(seed):
        return spec.base_model(config)


def pretrained_config(name: str) -> PretrainedConfig:
    """The config of a local directory or cached Hub id of a supported family; raises
    ModelNotFoundError or UnsupportedModelError (one line)."""
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise ModelNotFoundError(
            f"model '{name}' is neither a local directory nor available offline: "
            f"{_first_line(exc)}{_offline_hint(name)}") from exc
    except ValueError as exc:
        raise UnsupportedModelError(f"model '{name}': {_first_line(exc)}; supported families: "
                                    f"{', '.join(SUPPORTED_FAMILIES)}") from exc
    family_spec(config.model_type)
    return config


def pretrained_backbone(name: str, dropout: float) -> transformers.PreTrainedModel:
    """The unconverted float32 base model of a local directory or cached Hub id."""
    config = pretrained_config(name)
    spec = family_spec(config.model_type)
    _set_dropout(config, spec.dropout_keys, dropout)
    config.use_cache = False
    try:
        return spec.base_model.from_pretrained(name, config=config, dtype=torch.float32)
    except OSError as exc:  # a config without weights, a truncated or unreadable weight file
        raise ModelNotFoundError(f"model '{name}': its weights could not be loaded "
                                 f"({_first_line(exc)}){_offline_hint(name)}") from exc


def adapter_from_backbone(backbone: transformers.PreTrainedModel, family: str, num_labels: int,
                          seed: int) -> ModelAdapter:
    """Convert ``backbone``'s experts in place, add a head drawn from ``seed``, wrap it."""
    spec = family_spec(family)
    banks, routers = converted(spec, backbone, family)
    with seeded(seed):
        model = MoEClassifier(backbone, backbone.config.hidden_size, num_labels)
    embedding_ids = {id(p) for p in backbone.get_input_embeddings().parameters()}
    embedding_names = [n for n, p in model.named_parameters() if id(p) in embedding_ids]
    return ModelAdapter(family, model, banks, routers, spec.routing(backbone.config),
                        spec.top_k(backbone.config),
                        embedding_names)


def _causal_lm_adapter(model_cfg: ModelConfig, seed: int) -> ModelAdapter:
    """A fused-family ``*ForCausalLM`` (tiny random from ``seed``, or pretrained), converted."""
    from transformers import AutoModelForCausalLM

    from hfedmoe.model.causal_lm import MoECausalLM

    name = model_cfg.name
    if name == MINILM_MOE:
        raise UnsupportedModelError(
            "task 'causal-lm' needs a decoder MoE language model ('tiny:<family>', "
            "'smollm2-moe' or a folder of a supported family); 'minilm-moe' is an encoder")
    if name.startswith(TINY_PREFIX):
        family = name[len(TINY_PREFIX):]
        config = _causal_config(family, family_spec(family).tiny_config(family), model_cfg)
        with seeded(seed):
            causal_lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        folder = model_folder(model_cfg)
        config = pretrained_config(folder)
        config = _causal_config(config.model_type, config, model_cfg)
        try:
            causal_lm = AutoModelForCausalLM.from_pretrained(folder, config=config,
                                                             dtype=torch.float32)
        except OSError as exc:
            raise ModelNotFoundError(f"model '{folder}': its weights could not be loaded "
                                     f"({_first_line(exc)}){_offline_hint(folder)}") from exc
    family = config.model_type
    spec = family_spec(family)
    banks, routers = converted(spec, causal_lm.get_decoder(), family)
    model = MoECausalLM(causal_lm)
    embedding_ids = {id(p) for p in causal_lm.get_input_embeddings().parameters()}
    embedding_names = [n for n, p in model.named_parameters() if id(p) in embedding_ids]
    return ModelAdapter(family, model, banks, routers, spec.routing(config), spec.top_k(config),
                        embedding_names)


def _causal_config(family: str, config: PretrainedConfig, model_cfg: ModelConfig
                   ) -> PretrainedConfig:
    if family == switch.FAMILY:
        raise UnsupportedModelError(
            f"task 'causal-lm': model_type '{family}' is an encoder-decoder; causal-lm needs a "
            "decoder MoE family (e.g. qwen2_moe, mixtral, smollm2-moe)")
    _set_dropout(config, family_spec(family).dropout_keys, model_cfg.dropout)
    config.use_cache = False
    return config


def _minilm_adapter(model_cfg: ModelConfig, num_labels: int, seed: int) -> ModelAdapter:
    from hfedmoe.model.minilm import build_minilm_moe_backbone

    with seeded(seed):
        bert, blocks = build_minilm_moe_backbone(model_cfg.num_experts, model_cfg.top_k,
                                                 model_cfg.dropout)
        model = MoEClassifier(bert, bert.config.hidden_size, num_labels)
    embedding_names = [n for n, _ in model.named_parameters() if n.startswith("backbone.embeddings.")]
    return ModelAdapter(MINILM_MOE, model, [b.experts for b in blocks], [b.gate for b in blocks],
                        hf_moe.softmax_routing, model_cfg.top_k, embedding_names)


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """MiniLM's tokenizer for ``minilm-moe`` and ``tiny:*``, else the model's own; a tokenizer
    without a pad token gets ``pad = eos``."""
    name = model_cfg.name
    if name == MINILM_MOE or name.startswith(TINY_PREFIX):
        from hfedmoe.model.minilm import minilm_model_dir

        name = str(minilm_model_dir())
    else:
        name = model_folder(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # OSError, ValueError, tokenizers' own errors for missing files
        raise ModelNotFoundError(f"model '{name}': its tokenizer could not be loaded "
                                 f"({_first_line(exc)}){_offline_hint(name)}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelNotFoundError(f"model '{name}': its tokenizer has neither a pad nor an "
                                     "eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_name(model_cfg: ModelConfig) -> None:
    """Raise UnsupportedModelError or ModelNotFoundError (one line) unless ``model.name`` names
    a model of a supported family; reads a folder's config only (run it before the tokenizer,
    so that an unsupported family is named before a missing tokenizer file)."""
    name = model_cfg.name
    if name.startswith(TINY_PREFIX):
        family = name[len(TINY_PREFIX):]
        check_structure(family_spec(family).tiny_config(family))
    elif name != MINILM_MOE:
        check_structure(pretrained_config(model_folder(model_cfg)))


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Raise ModelNotFoundError unless ``tokenizer`` turns :data:`PROBE_SENTENCE` into known
    tokens: at most a quarter may be its unknown token. A model folder saved without its
    tokenizer files can still yield a tokenizer that maps every word to ``<unk>``, and a run
    on such input learns nothing from the text."""
    ids = tokenizer(PROBE_SENTENCE, add_special_tokens=False)["input_ids"]
    unknown = sum(1 for i in ids if i == tokenizer.unk_token_id)
    if not ids or unknown * 4 > len(ids):
        raise ModelNotFoundError(
            f"model '{name}': its tokenizer maps the test sentence {PROBE_SENTENCE!r} to "
            f"{unknown} unknown of {len(ids)} tokens; is the folder missing its tokenizer "
            "files (tokenizer.json, tokenizer_config.json, vocab or spiece.model)?")


def check_model_inputs(adapter: ModelAdapter, tokenizer: PreTrainedTokenizerBase,
                       max_length: int, name: str) -> None:
    """Raise ConfigError unless inputs of ``max_length`` tokens from ``tokenizer`` fit the
    model: positions (``max_position_embeddings`` where the family has one), vocabulary (every
    token id below the embedding's rows), and one forward pass of a full-length batch of two
    rows without gradients (which catches any other limit). The model's weights and mode are
    unchanged."""
    backbone = adapter.model.backbone
    positions = getattr(backbone.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ConfigError(f"config key 'model.max-length' = {max_length} is invalid: expected "
                          f"an integer <= {positions}, the positions of model '{name}'")
    rows = backbone.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelNotFoundError(f"model '{name}': its tokenizer has {len(tokenizer)} tokens but "
                                 f"the model's embedding only {rows} rows")
    encoded = tokenizer([PROBE_SENTENCE * max_length] * 2, padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt", return_token_type_ids=False)
    device = next(adapter.model.parameters()).device
    training = adapter.model.training
    try:
        with torch.no_grad():
            adapter.model.eval()
            adapter.model(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))
    except (RuntimeError, IndexError, ValueError) as exc:
        raise ConfigError(f"config key 'model.max-length' = {max_length}: model '{name}' fails "
                          f"on inputs of that length ({_first_line(exc)})") from exc
    finally:
        adapter.model.train(training)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU RNG seeded to ``seed``; restore the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _set_dropout(config: PretrainedConfig, keys: tuple[str, ...], dropout: float) -> None:
    for key in keys:
        setattr(config, key, dropout)


def _offline_hint(name: str) -> str:
    """OFFLINE_HINT for a name that is not a local folder (a Hub id), else ''."""
    return "" if Path(name).is_dir() else OFFLINE_HINT


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
