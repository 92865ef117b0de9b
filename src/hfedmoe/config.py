"""Run configuration: typed, frozen, parsed once, validated by raising.

This module is the ONLY parser of run configuration. Every entry point (the CLI, the
ServerApp under `flwr run`, tests) turns a flat mapping of hyphenated, dotted keys
(``"model.name"``, ``"num-server-rounds"``) into a :class:`RunConfig` with
:func:`parse_run_config`. Defaults live in ``defaults.toml`` beside this file.

Validation never "fixes" a value: a bad value raises :class:`ConfigError` whose message
names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from hfedmoe.model.lora import LoRASettings

Scalar = bool | int | float | str

METHODS = ("hfedmoe", "fedavg", "fedavg-full", "fedavg-drop", "random-subset", "fedmoe", "flex",
           "hfedmoe-no-ib", "hfedmoe-fedavg-agg", "hfedmoe-uniform-gate", "hfedmoe-data-share",
           *(f"{base}{ablation}" for base in ("fedalign", "hfedmoe-align")
             for ablation in ("", "-no-gate", "-no-reg", "-no-consistency")))
SPLIT_METHODS = ("ho-sfl", "sfl", "zo-sfl")  # split learning (hfedmoe.strategies.ho_sfl)
METHODS = METHODS + SPLIT_METHODS
ALIGNING_METHODS = tuple(m for m in METHODS if "align" in m)  # hfedmoe.strategies.fedalign
DIVERGENCES = ("kl", "js")  # hfedmoe.alignment.routing_divergence
TASKS = ("classification", "causal-lm")  # hfedmoe.tasks
DATA_SOURCES = ("bbc-news", "wordnet", "quiz", "debian-faq", "file", "hf")
PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
PRECISIONS = ("auto", "fp32", "bf16-mixed")  # "auto": bf16-mixed on a CUDA device with bf16
TRAINABLE_NON_EXPERT = ("head", "all")
RUNTIMES = ("ray", "inprocess")
ON_TOO_FEW = ("skip", "retry")
ROBUST_AGGREGATIONS = ("mean", "clip", "trimmed-mean")
FAILURE_MODES = ("raise", "hang")
ATTACKS = ("sign-flip", "scale")
EXPERT_STEPS = ("holders", "data-share")  # hfedmoe.aggregation.aggregate_experts
ADAPTERS = ("none", "lora")  # train.adapter; hfedmoe.model.lora
LR_SCHEDULES = ("constant", "cosine")  # train.lr-schedule: over rounds (hfedmoe.client.round_lr)
QUANTIZATIONS = ("none", "nf4", "int8")  # model.quantization; hfedmoe.model.quantize
LORA_TARGETS = ("experts", "experts+attention")  # lora.targets; hfedmoe.model.lora
LORA_AGGREGATIONS = ("factors", "frozen-a")  # hfedmoe.model.lora
BUDGET_MODES = ("one-pass", "recompute")  # hfedmoe.model.sparse_experts
OPTIMIZER_STATES = ("batch", "round")  # hfedmoe.training.drop_idle_expert_state


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming key and value."""


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    flat: dict[str, Scalar] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def default_flat_config() -> dict[str, Scalar]:
    """The defaults of every key, flat (``{"model.name": "minilm-moe", ...}``)."""
    text = resources.files("hfedmoe").joinpath("defaults.toml").read_text(encoding="utf-8")
    return _flatten(tomllib.loads(text))


def load_config_file(path: str | Path) -> dict[str, Scalar]:
    """Read an experiment TOML file (tables allowed) into a flat mapping."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{file}' does not exist")
    try:
        table = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{file}' is not valid TOML: {exc}") from exc
    # A file may be a pyproject-style app config; accept [tool.flwr.app.config] too.
    table = table.get("tool", {}).get("flwr", {}).get("app", {}).get("config", table)
    return _flatten(table)


def parse_assignment(text: str) -> tuple[str, Scalar]:
    """Parse one ``key=value`` override; the value is read as a TOML literal if it is one."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as fedavg or a path
    if isinstance(value, (list, dict)):
        raise ConfigError(f"override '{key}': lists and tables are not allowed; use a string")
    return key, value


def merge_flat(defaults: Mapping[str, Scalar], *layers: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """Overlay ``layers`` on ``defaults``; unknown keys are rejected with a suggestion.

    Values are coerced to the type of the default (int -> float allowed, strings from a
    command line converted with the same rules); a mismatch raises ConfigError.
    """
    merged = dict(defaults)
    for layer in layers:
        for key, value in layer.items():
            if key not in defaults:
                hint = difflib.get_close_matches(key, list(defaults), n=1)
                suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
                raise ConfigError(f"unknown config key '{key}'{suggestion}")
            merged[key] = _coerce(key, value, defaults[key])
    return merged


def _coerce(key: str, value: Scalar, default: Scalar) -> Scalar:
    """``value`` as the type of ``default``; every float must be finite (inf and nan are
    TOML literals, but no key of the run configuration means anything with them)."""
    value = _coerce_type(key, value, default)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected a finite number")
    return value


def _coerce_type(key: str, value: Scalar, default: Scalar) -> Scalar:
    expected = type(default)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(
        f"config key '{key}' = {value!r}: expected {_TYPE_NAMES[expected]}"
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str
    num_experts: int
    top_k: int
    max_length: int
    trainable_non_expert: str
    aux_loss_coef: float
    device: str
    dropout: float
    precision: str = "auto"  # default: export manifests written before the key existed
    quantization: str = "none"  # the routed experts' frozen weights: "none", "nf4", "int8"

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", self.name, "a model name or path")
        _require(self.num_experts >= 1, "model.num-experts", self.num_experts, "an integer >= 1")
        _require(1 <= self.top_k <= self.num_experts, "model.top-k", self.top_k,
                 f"an integer in [1, model.num-experts={self.num_experts}]")
        _require(self.max_length >= 8, "model.max-length", self.max_length, "an integer >= 8")
        _choice("model.trainable-non-expert", self.trainable_non_expert, TRAINABLE_NON_EXPERT)
        _require(self.aux_loss_coef >= 0, "model.aux-loss-coef", self.aux_loss_coef, "a number >= 0")
        _require(self.device == "cpu" or self.device.startswith("cuda"), "model.device",
                 self.device, "'cpu', 'cuda' or 'cuda:N'")
        _require(0 <= self.dropout < 1, "model.dropout", self.dropout, "a number in [0, 1)")
        _choice("model.precision", self.precision, PRECISIONS)
        _choice("model.quantization", self.quantization, QUANTIZATIONS)


@dataclass(frozen=True)
class DataConfig:
    source: str
    path: str
    max_examples: int
    hf_name: str
    text_field: str
    label_field: str
    encoding: str  # file source: a Python codec name (a byte-order mark takes precedence)
    test_fraction: float
    num_clients: int
    partition: str
    dirichlet_alpha: float
    classes_per_client: int
    min_partition_size: int
    client_test_fraction: float

    def __post_init__(self) -> None:
        _choice("data.source", self.source, DATA_SOURCES)
        if self.source == "file":
            _require(bool(self.path), "data.path", self.path, "a .jsonl or .csv file when data.source = 'file'")
        if self.source == "hf":
            _require(bool(self.hf_name), "data.hf-name", self.hf_name, "a dataset name when data.source = 'hf'")
        _require(self._is_text_codec(self.encoding), "data.encoding", self.encoding,
                 "a Python text codec name such as 'utf-8', 'cp1252', 'latin-1' or 'utf-16'")
        _require(0 < self.test_fraction < 1, "data.test-fraction", self.test_fraction, "a number in (0, 1)")
        _require(self.num_clients >= 1, "data.num-clients", self.num_clients, "an integer >= 1")
        _choice("data.partition", self.partition, PARTITIONERS)
        _require(self.dirichlet_alpha > 0, "data.dirichlet-alpha", self.dirichlet_alpha, "a number > 0")
        _require(self.classes_per_client >= 1, "data.classes-per-client", self.classes_per_client,
                 "an integer >= 1")
        _require(self.min_partition_size >= 0, "data.min-partition-size", self.min_partition_size,
                 "an integer >= 0")
        _require(self.max_examples >= 0, "data.max-examples", self.max_examples,
                 "an integer >= 0 (0 = all examples)")
        _require(0 <= self.client_test_fraction < 1, "data.client-test-fraction",
                 self.client_test_fraction, "a number in [0, 1) (0 = no per-client test split)")

    @staticmethod
    def _is_text_codec(name: str) -> bool:
        """Whether ``codecs.lookup`` knows ``name`` and it decodes bytes to text (not e.g.
        'base64' or 'rot13')."""
        import codecs

        try:
            codecs.lookup(name)
        except (LookupError, ValueError):  # ValueError: a NUL in the name
            return False
        try:
            b"\x00\x00".decode(name)  # empty input would skip the text-encoding check
        except LookupError:
            return False
        except UnicodeError:
            pass  # a text codec that rejects these bytes
        return True


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    fraction_train: float
    eval_batch_size: int
    fraction_evaluate: float  # share of connected clients sampled for client-side evaluation
    evaluate_every: int  # client-side evaluation every k rounds (and the last round)
    adapter: str  # "none": experts train their weights; "lora": per-expert LoRA ([lora])
    packing: bool  # causal-lm: several examples per row of model.max-length tokens
    lr_schedule: str = "constant"  # "cosine": the clients' lr anneals over the rounds
    lr_min: float = 0.0  # cosine: the lr the annealing approaches after the last round

    def __post_init__(self) -> None:
        _choice("train.adapter", self.adapter, ADAPTERS)
        _choice("train.lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _require(self.local_steps >= 1, "train.local-steps", self.local_steps, "an integer >= 1")
        _require(self.batch_size >= 1, "train.batch-size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _require(0 <= self.lr_min < self.lr, "train.lr-min", self.lr_min,
                 f"a number >= 0 below train.lr ({self.lr:g})")
        _require(self.weight_decay >= 0, "train.weight-decay", self.weight_decay, "a number >= 0")
        _require(0 < self.fraction_train <= 1, "train.fraction-train", self.fraction_train,
                 "a number in (0, 1]")
        _require(self.eval_batch_size >= 1, "train.eval-batch-size", self.eval_batch_size,
                 "an integer >= 1")
        _require(0 < self.fraction_evaluate <= 1, "train.fraction-evaluate",
                 self.fraction_evaluate, "a number in (0, 1]")
        _require(self.evaluate_every >= 1, "train.evaluate-every", self.evaluate_every,
                 "an integer >= 1")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int  # r of every expert projection's factors
    alpha: float  # the update is scaled by alpha / r
    dropout: float  # dropout on the factors' input
    targets: str  # what gets factors: "experts" (every routed expert's projections),
    # "experts+attention" (and every attention projection: q, k, v, o or the family's names)
    aggregation: str  # "factors": A and B trained and averaged apart; "frozen-a": only B

    def __post_init__(self) -> None:
        _choice("lora.aggregation", self.aggregation, LORA_AGGREGATIONS)
        _require(self.rank >= 1, "lora.rank", self.rank, "an integer >= 1")
        _require(self.alpha > 0 and math.isfinite(self.alpha), "lora.alpha", self.alpha,
                 "a finite number > 0")
        _require(0 <= self.dropout < 1, "lora.dropout", self.dropout, "a number in [0, 1)")
        _choice("lora.targets", self.targets, LORA_TARGETS)

    @property
    def attention(self) -> bool:
        """Whether attention projections get factors too."""
        return self.targets == "experts+attention"

    def settings(self) -> "LoRASettings":
        from hfedmoe.model.lora import LoRASettings

        return LoRASettings(self.rank, float(self.alpha), float(self.dropout),
                            train_a=self.aggregation == "factors")


@dataclass(frozen=True)
class BudgetConfig:
    experts: str  # budget spec string, parsed by hfedmoe.budget (validated here)
    per_layer: int  # 0 = no per-layer cap
    mode: str  # "one-pass" or "recompute": how budgeted experts run (hfedmoe.model.sparse_experts)
    optimizer_state: str  # "batch" or "round": whose AdamW moments a client keeps (training)
    calibration: str  # "" or a `hfedmoe bench step --json` file (hfedmoe.calibration)

    def __post_init__(self) -> None:
        from hfedmoe.budget import parse_budget_spec

        try:
            parse_budget_spec(self.experts)
        except ValueError as exc:
            raise ConfigError(f"config key 'budget.experts' = {self.experts!r} is invalid: {exc}"
                              ) from None
        _require(self.per_layer >= 0, "budget.per-layer", self.per_layer,
                 "an integer >= 0 (0 = no per-layer cap)")
        _choice("budget.mode", self.mode, BUDGET_MODES)
        _choice("budget.optimizer-state", self.optimizer_state, OPTIMIZER_STATES)


@dataclass(frozen=True)
class HFedMoEConfig:
    lambda_: float  # key "lambda" (a Python keyword)
    beta: float
    tau: float
    expert_step: str  # "holders" (Eq. 17) or "data-share" (hfedmoe.aggregation)

    def __post_init__(self) -> None:
        _require(0 <= self.lambda_ <= 1, "hfedmoe.lambda", self.lambda_, "a number in [0, 1]")
        _require(self.beta >= 0 and math.isfinite(self.beta), "hfedmoe.beta", self.beta,
                 "a finite number >= 0")
        _require(0 <= self.tau <= 1, "hfedmoe.tau", self.tau, "a number in [0, 1]")
        _choice("hfedmoe.expert-step", self.expert_step, EXPERT_STEPS)


@dataclass(frozen=True)
class FedAlignConfig:
    divergence: str  # "kl" | "js" of the routing regulariser (hfedmoe.alignment)
    routing_weight: float  # weight of the regulariser in the local loss (0: off)
    consistency_beta: float  # adaptive threshold mean - beta * std of expert similarities
    consistency_floor: float  # a holder whose mean cosine kappa_c >= floor is always kept

    def __post_init__(self) -> None:
        _choice("fedalign.divergence", self.divergence, DIVERGENCES)
        _require(self.routing_weight >= 0 and math.isfinite(self.routing_weight),
                 "fedalign.routing-weight", self.routing_weight, "a finite number >= 0")
        _require(self.consistency_beta >= 0 and math.isfinite(self.consistency_beta),
                 "fedalign.consistency-beta", self.consistency_beta, "a finite number >= 0")
        _require(-1 <= self.consistency_floor <= 1, "fedalign.consistency-floor",
                 self.consistency_floor, "a number in [-1, 1]")


@dataclass(frozen=True)
class HOSFLConfig:
    """Split learning (methods ho-sfl, sfl, zo-sfl; hfedmoe.strategies.ho_sfl)."""

    split_layer: int  # transformer blocks on the client (with the embeddings)
    directions: int  # P: zeroth-order directions per round (ho-sfl, zo-sfl)
    mu: float  # perturbation scale of the directions
    client_lr: float  # AdamW learning rate of the client part (0: train.lr)
    active_experts: bool  # ho-sfl: perturb only the experts HFedMoE's selection picks

    def __post_init__(self) -> None:
        _require(self.split_layer >= 1, "ho-sfl.split-layer", self.split_layer,
                 "an integer >= 1 (blocks on the client)")
        _require(1 <= self.directions <= 1024, "ho-sfl.directions", self.directions,
                 "an integer in [1, 1024]")
        _require(0 < self.mu <= 1 and math.isfinite(self.mu), "ho-sfl.mu", self.mu,
                 "a number in (0, 1]")
        _require(self.client_lr >= 0 and math.isfinite(self.client_lr), "ho-sfl.client-lr",
                 self.client_lr, "a finite number >= 0 (0: train.lr)")


@dataclass(frozen=True)
class SimulationConfig:
    runtime: str
    client_cpus: int

    def __post_init__(self) -> None:
        _choice("simulation.runtime", self.runtime, RUNTIMES)
        _require(self.client_cpus >= 1, "simulation.client-cpus", self.client_cpus, "an integer >= 1")


@dataclass(frozen=True)
class FederationConfig:
    min_replies: int
    on_too_few: str
    max_retries: int
    round_timeout: float
    sampling_deadline: float
    max_update_norm: float  # 0 = no bound

    def __post_init__(self) -> None:
        _require(self.min_replies >= 1, "federation.min-replies", self.min_replies,
                 "an integer >= 1")
        _choice("federation.on-too-few", self.on_too_few, ON_TOO_FEW)
        _require(self.max_retries >= 0, "federation.max-retries", self.max_retries,
                 "an integer >= 0")
        _require(self.round_timeout > 0 and math.isfinite(self.round_timeout),
                 "federation.round-timeout", self.round_timeout, "a finite number of seconds > 0")
        _require(self.sampling_deadline > 0 and math.isfinite(self.sampling_deadline),
                 "federation.sampling-deadline", self.sampling_deadline,
                 "a finite number of seconds > 0")
        _require(self.max_update_norm >= 0 and math.isfinite(self.max_update_norm),
                 "federation.max-update-norm", self.max_update_norm,
                 "a finite number >= 0 (0 = no bound)")


@dataclass(frozen=True)
class RobustConfig:
    aggregation: str
    clip_norm: float  # 0 = the round's median norm
    trim_fraction: float

    def __post_init__(self) -> None:
        _choice("robust.aggregation", self.aggregation, ROBUST_AGGREGATIONS)
        _require(self.clip_norm >= 0 and math.isfinite(self.clip_norm), "robust.clip-norm",
                 self.clip_norm, "a finite number >= 0 (0 = the round's median norm)")
        _require(0 <= self.trim_fraction < 0.5, "robust.trim-fraction", self.trim_fraction,
                 "a number in [0, 0.5)")


@dataclass(frozen=True)
class FaultsConfig:
    """Fault and attack injection, for testing a deployment's resilience (off by default)."""

    client_failure_rate: float
    failure_mode: str
    attackers: str  # comma-separated client ids; see attacker_ids
    attack: str
    attack_scale: float

    def __post_init__(self) -> None:
        _require(0 <= self.client_failure_rate < 1, "faults.client-failure-rate",
                 self.client_failure_rate, "a number in [0, 1)")
        _choice("faults.failure-mode", self.failure_mode, FAILURE_MODES)
        try:
            self.attacker_ids
        except ValueError:
            _require(False, "faults.attackers", self.attackers,
                     "comma-separated client ids (integers >= 0), or '' for none")
        _choice("faults.attack", self.attack, ATTACKS)
        _require(self.attack_scale > 0 and math.isfinite(self.attack_scale),
                 "faults.attack-scale", self.attack_scale, "a finite number > 0")

    @property
    def attacker_ids(self) -> frozenset[int]:
        ids = frozenset(int(part) for part in self.attackers.split(",") if part.strip())
        if any(i < 0 for i in ids):
            raise ValueError("negative client id")
        return ids


@dataclass(frozen=True)
class GenerateConfig:
    examples: int  # causal-lm: held-out prompts answered greedily at each evaluation (0 = none)
    max_new_tokens: int  # greedy decoding bound per answer

    def __post_init__(self) -> None:
        _require(self.examples >= 0, "generate.examples", self.examples,
                 "an integer >= 0 (0 = no generation metrics)")
        _require(self.max_new_tokens >= 1, "generate.max-new-tokens", self.max_new_tokens,
                 "an integer >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int  # rounds between checkpoints; 0 = never
    keep: int
    resume: bool

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", self.every, "an integer >= 0 (0 = never)")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")


@dataclass(frozen=True)
class RunConfig:
    method: str
    task: str
    num_server_rounds: int
    seed: int
    out: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoRAConfig
    budget: BudgetConfig
    hfedmoe: HFedMoEConfig
    fedalign: FedAlignConfig
    ho_sfl: HOSFLConfig
    simulation: SimulationConfig
    federation: FederationConfig
    robust: RobustConfig
    faults: FaultsConfig
    checkpoint: CheckpointConfig
    generate: GenerateConfig

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("task", self.task, TASKS)
        _require(self.task == "causal-lm" or self.data.source not in ("quiz", "debian-faq"),
                 "data.source", self.data.source, f"'{self.data.source}' only with task = "
                 "'causal-lm' (question -> answer pairs)")
        _require(self.model.quantization == "none" or self.train.adapter == "lora",
                 "model.quantization", self.model.quantization,
                 "'none' unless train.adapter = 'lora' (only frozen expert weights are quantized)")
        _require(not (self.train.adapter == "lora" and self.lora.attention)
                 or self.model.trainable_non_expert == "head", "model.trainable-non-expert",
                 self.model.trainable_non_expert, "'head' with lora.targets = "
                 "'experts+attention' (with 'all' attention weights train fully: no factors)")
        _require(not self.train.packing or self.task == "causal-lm", "train.packing",
                 self.train.packing, "false with task = 'classification' (one label per text)")
        _require(not self.train.packing or self.method not in SPLIT_METHODS, "train.packing",
                 self.train.packing, f"false with method '{self.method}' (split learning sends "
                 "padded rows across the cut)")
        _require(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds,
                 "an integer >= 1")
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        sampled = self.sampled_per_round
        _require(self.federation.min_replies <= sampled, "federation.min-replies",
                 self.federation.min_replies,
                 f"an integer <= the {sampled} clients sampled per round "
                 "(train.fraction-train x data.num-clients)")
        _require(self.method not in ALIGNING_METHODS or self.robust.aggregation != "trimmed-mean",
                 "robust.aggregation", self.robust.aggregation,
                 f"'mean' or 'clip' with method '{self.method}' (its gate weights differ per "
                 "router row and its expert holders depend on the updates: no per-key weights "
                 "for a trimmed mean)")
        split = self.method in SPLIT_METHODS
        _require(not split or self.robust.aggregation == "mean", "robust.aggregation",
                 self.robust.aggregation, f"'mean' with method '{self.method}' (split learning "
                 "averages scalars or gradients, not uploaded models)")
        _require(not split or not self.faults.attacker_ids, "faults.attackers",
                 self.faults.attackers, f"none with method '{self.method}'")
        _require(all(i < self.data.num_clients for i in self.faults.attacker_ids),
                 "faults.attackers", self.faults.attackers,
                 f"client ids below data.num-clients = {self.data.num_clients}")

    @property
    def sampled_per_round(self) -> int:
        """Clients sampled per round when all ``data.num-clients`` nodes are connected."""
        return max(1, round(self.train.fraction_train * self.data.num_clients))

    def to_flat(self) -> dict[str, Scalar]:
        """The flat, hyphenated form (inverse of :func:`parse_run_config`)."""
        flat: dict[str, Scalar] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    flat[f"{_key(field.name)}.{_key(sub.name)}"] = getattr(value, sub.name)
            else:
                flat[_key(field.name)] = value
        return flat


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
             "lora": LoRAConfig, "budget": BudgetConfig, "hfedmoe": HFedMoEConfig, "fedalign": FedAlignConfig,
             "ho_sfl": HOSFLConfig, "simulation": SimulationConfig,
             "federation": FederationConfig, "robust": RobustConfig, "faults": FaultsConfig,
             "checkpoint": CheckpointConfig, "generate": GenerateConfig}


def parse_run_config(*layers: Mapping[str, Scalar]) -> RunConfig:
    """Defaults overlaid with ``layers`` (later wins) -> validated :class:`RunConfig`."""
    flat = merge_flat(default_flat_config(), *layers)
    sections = {
        name: cls(**{f.name: flat[f"{_key(name)}.{_key(f.name)}"]
                     for f in dataclasses.fields(cls)})
        for name, cls in _SECTIONS.items()
    }
    top = {f.name: flat[_key(f.name)] for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS}
    return RunConfig(**top, **sections)


def _key(field_name: str) -> str:
    return field_name.rstrip("_").replace("_", "-")


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {allowed}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, value, "one of " + ", ".join(repr(a) for a in allowed))
