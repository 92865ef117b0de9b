"""The message schema: every record key and codec of hfedmoe's Flower messages lives here.

Train instruction (server -> client), message type ``train``:
  ``"global"``  ArrayRecord  - the global trainable tensors, flat keys (hfedmoe.model.state)
  ``"plan"``    ConfigRecord - ``server-round``, ``run-config`` (the resolved run
                               configuration as JSON, parsed again by hfedmoe.config),
                               ``lineage`` (names the run across resumptions; "" = none:
                               the client keeps no personal state on disk,
                               hfedmoe.personal_store), ``calibration`` (the run's
                               budget calibration as JSON, hfedmoe.calibration; "" = none)
  ``"guidance"`` ArrayRecord - optional: tensors the method's server sends every client
                               besides the global state (hfedmoe.strategies.GuidedMethod;
                               FedAlign-MoE: ``routing-target``, (L, S))
Train reply (client -> server):
  ``"update"``  ArrayRecord  - the tensors the client uploads (any subset of the global keys)
  ``"metrics"`` MetricRecord - ``num-examples``, ``client-id``, ``train-loss``,
                               ``budget-experts``, ``max-active-experts-per-batch``,
                               ``peak-memory-bytes`` (measured by the allocator),
                               ``peak-memory-estimate-bytes`` (tensor accounting),
                               ``mean-step-seconds``,
                               ``local-steps`` (0: the client sat the round out);
                               with one-pass selection also ``selection-overlap``,
                               ``selection-share`` (vs the exact Eq. 15 set, round means);
                               with a routing regulariser ``routing-loss`` (round mean);
                               ``process-resident-bytes`` and ``process-peak-resident-bytes``
                               (the client process after the round: resident now, lifetime
                               peak; hfedmoe.measurement.process_memory)
  ``"routing"`` MetricRecord - flattened row-major from (L, S): ``usage`` u_c(e) (Eq. 16),
                               ``trained`` (1 = the expert got a gradient this round),
                               ``importance`` s^c(e) (methods that select experts only)

Evaluate instruction (server -> every node), message type ``evaluate``: the same two records
as the train instruction (``"global"``, ``"plan"``).
Evaluate reply (client -> server):
  ``"evaluation"`` MetricRecord - ``client-id``, ``num-examples`` (size of the client's own
                               test split), ``accuracy``, ``loss`` of the global model with the
                               client's personal state loaded over it, on that split
Identity query (server -> node), message type ``query``, sent once per node and run when a
round samples fewer than all connected nodes (node ids are random per run; the sample is
drawn over client ids, so that it is the same in every run of a configuration):
  ``"plan"``    ConfigRecord - ``server-round``
Identity reply (node -> server):
  ``"identity"`` MetricRecord - ``client-id`` (the node's partition id)

Split learning (methods ho-sfl, sfl, zo-sfl; hfedmoe.strategies.ho_sfl), message type
``train``, two exchanges per round (zo-sfl: the first only):
  instruction ``"plan"`` ConfigRecord - ``server-round``, ``run-config``, ``phase``
                               (``forward`` | ``perturbed`` | ``zo`` | ``gradient``),
                               ``seeds`` (the round's P direction seeds; perturbed, zo)
  instruction ``"client-part"`` ArrayRecord - theta_c, the client part's trainable tensors,
                               and the server-trained tensors it also uses (a head tied to
                               the input embeddings) (forward, perturbed)
  instruction ``"cut-gradient"`` ArrayRecord - ``lambda`` (B, T, H): dL/dz of this client's
                               batch (zo, gradient)
  reply ``"activations"`` ArrayRecord - ``z`` (B, T, H) cut-layer activations (perturbed: also
                               ``z.<p>`` at theta_c + mu u_p), ``attention-mask`` (B, T),
                               ``labels`` (B,) class ids or (B, T) token ids (-100 = ignored)
  reply ``"scalars"`` MetricRecord - ``values``: the P zeroth-order scalars v_p (zo);
                               ``active``: flattened (L, S) 0/1, the experts it perturbed
                               (ho-sfl.active-experts; counted 1 byte each)
  reply ``"update"`` ArrayRecord - the client part's gradient, flat keys (gradient)
  reply ``"metrics"`` MetricRecord - ``client-id``, ``num-examples`` (|D_c|),
                               ``batch-examples`` (B, the round's one batch),
                               ``peak-memory-bytes``, ``mean-step-seconds`` (the client's
                               compute this exchange), and the process memory keys
Node state: ``"split-client"`` ArrayRecord - theta_c of the first exchange, kept for the
second (never sent).

Node state (``context.state``, kept by the node across rounds, never sent):
  ``"personal"`` ArrayRecord  - the client's personal tensors (flat keys; methods with a
                               personal part, e.g. flex), absent before its first round

The client resolves its own budget (from the run config or its node config, one function:
hfedmoe.budget.resolve_budget) and reports it in ``budget-experts``.

Arrays travel as float32 numpy arrays (Flower's ArrayRecord rejects bfloat16).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from hfedmoe.aggregation import ClientUpdate
from hfedmoe.calibration import Calibration
from hfedmoe.measurement import ProcessMemory
from hfedmoe.training import LocalTrainingResult
from hfedmoe.validation import check_tensors

GLOBAL, PLAN, UPDATE, METRICS, ROUTING = "global", "plan", "update", "metrics", "routing"
GUIDANCE = "guidance"
CLIENT_PART, CUT_GRADIENT, ACTIVATIONS, SCALARS = ("client-part", "cut-gradient", "activations",
                                                   "scalars")
SPLIT_STATE = "split-client"
SPLIT_PHASES = ("forward", "perturbed", "zo", "gradient")
EVALUATION, PERSONAL, IDENTITY = "evaluation", "personal", "identity"
EVALUATE_METRIC_KEYS = ("client-id", "num-examples", "accuracy", "loss")
REPLY_METRIC_KEYS = ("num-examples", "client-id", "train-loss", "budget-experts",
                     "max-active-experts-per-batch", "peak-memory-bytes",
                     "peak-memory-estimate-bytes", "mean-step-seconds", "local-steps")
# sent when the client selected experts in one pass (budget.mode = "one-pass"); diagnostics
OPTIONAL_REPLY_METRIC_KEYS = ("selection-overlap", "selection-share", "routing-loss",
                              "process-resident-bytes", "process-peak-resident-bytes")


def to_array_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().to("cpu", torch.float32).numpy()) for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


class ArrayState(Mapping[str, torch.Tensor]):
    """A read-only view of an ArrayRecord as flat-key tensors, decoded on access: loading it
    into a model (``write_state``) holds one decoded tensor at a time, not a second copy of
    the whole state (a client of SmolLM2-MoE saves 1.2 GiB during its training)."""

    def __init__(self, record: ArrayRecord) -> None:
        self._record = record

    def __getitem__(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self._record[key].numpy(), copy=True))

    def __iter__(self):
        return iter(self._record.keys())

    def __len__(self) -> int:
        return len(self._record)


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord as serialised (what travels)."""
    return sum(len(array.data) for array in record.values())


@dataclass(frozen=True)
class TrainInstruction:
    server_round: int
    run_config: dict  # flat resolved configuration
    global_state: Mapping[str, torch.Tensor]  # ArrayState: decoded key by key on access
    lineage: str = ""  # the run across resumptions ("": no personal state on disk)
    calibration: Calibration | None = None  # budgets measured on the model (budget.calibration)
    guidance: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's (GuidedMethod)


def train_instruction(server_round: int, flat_config: Mapping, global_arrays: ArrayRecord,
                      lineage: str = "", calibration: Calibration | None = None,
                      guidance: ArrayRecord | None = None) -> RecordDict:
    """``guidance``: the method's extra tensors (``to_array_record``), omitted when None or
    empty."""
    config = ConfigRecord({
        "server-round": server_round,
        "run-config": json.dumps(dict(flat_config), sort_keys=True),
        "lineage": lineage,
        "calibration": calibration.to_json() if calibration is not None else "",
    })
    content = RecordDict({GLOBAL: global_arrays, PLAN: config})
    if guidance:
        content[GUIDANCE] = guidance
    return content


def parse_train_instruction(content: RecordDict) -> TrainInstruction:
    plan = content.config_records[PLAN]
    return TrainInstruction(
        server_round=int(plan["server-round"]),
        run_config=json.loads(str(plan["run-config"])),
        global_state=ArrayState(content.array_records[GLOBAL]),
        lineage=str(plan.get("lineage", "")),
        calibration=(Calibration.from_mapping(json.loads(str(plan["calibration"])))
                     if plan.get("calibration") else None),
        guidance=(from_array_record(content.array_records[GUIDANCE])
                  if GUIDANCE in content.array_records else {}),
    )


def train_reply(client_id: int, budget_experts: int, upload: Mapping[str, torch.Tensor],
                result: LocalTrainingResult, process: ProcessMemory | None = None
                ) -> RecordDict:
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "client-id": client_id,
        "train-loss": result.train_loss,
        "budget-experts": budget_experts,
        "max-active-experts-per-batch": result.max_active_experts_per_batch,
        "peak-memory-bytes": result.peak_memory_bytes,
        "peak-memory-estimate-bytes": result.peak_memory_estimate_bytes,
        "mean-step-seconds": result.mean_step_seconds,
        "local-steps": result.local_steps,
        **({"selection-overlap": result.selection_overlap,
            "selection-share": result.selection_share}
           if result.selection_overlap is not None else {}),
        **({"routing-loss": result.routing_loss} if result.routing_loss is not None else {}),
        **({"process-resident-bytes": process.resident_bytes,
            "process-peak-resident-bytes": process.peak_resident_bytes}
           if process is not None else {}),
    })
    routing = {"usage": _flat(result.usage),
               "trained": [int(t) for t in result.trained_experts.reshape(-1)]}
    if result.importance is not None:
        routing["importance"] = _flat(result.importance)
    routing = MetricRecord(routing)
    return RecordDict({UPDATE: to_array_record(upload), METRICS: metrics, ROUTING: routing})


def _flat(matrix: torch.Tensor) -> list[float]:
    return [float(v) for v in matrix.reshape(-1)]


def _matrix(routing: MetricRecord, key: str, shape: tuple[int, int]) -> torch.Tensor:
    values = torch.tensor(list(routing[key]), dtype=torch.float32)
    if values.numel() != shape[0] * shape[1]:
        raise ValueError(f"reply '{key}' has {values.numel()} values, expected {shape}")
    return values.reshape(shape)


def parse_train_reply(content: RecordDict, usage_shape: tuple[int, int]) -> ClientUpdate:
    """Decode a reply; raises ValueError naming the problem if a field is missing or malformed."""
    for key, kind in ((UPDATE, content.array_records), (METRICS, content.metric_records),
                      (ROUTING, content.metric_records)):
        if key not in kind:
            raise ValueError(f"reply lacks the '{key}' record")
    metrics = content.metric_records[METRICS]
    missing = [k for k in REPLY_METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"reply metrics lack {', '.join(missing)}")
    routing = content.metric_records[ROUTING]
    for key in ("usage", "trained"):
        if key not in routing:
            raise ValueError(f"reply routing lacks '{key}'")
    usage = _matrix(routing, "usage", usage_shape)  # (L, S)
    trained = _matrix(routing, "trained", usage_shape)  # (L, S) 0/1
    if not bool(((trained == 0) | (trained == 1)).all()):
        raise ValueError("reply 'trained' has values other than 0 and 1")
    return ClientUpdate(
        client_id=_integer(metrics, "client-id"),
        num_examples=_integer(metrics, "num-examples"),
        state=from_array_record(content.array_records[UPDATE]),
        usage=usage,
        metrics={k: float(metrics[k]) for k in (*REPLY_METRIC_KEYS, *OPTIONAL_REPLY_METRIC_KEYS)
                 if k in metrics},
        importance=(_matrix(routing, "importance", usage_shape) if "importance" in routing
                    else None),
        trained=trained.bool(),
    )


def _integer(metrics: MetricRecord, key: str) -> int:
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value != int(value):
        raise ValueError(f"reply metric '{key}' = {value!r} is not an integer")
    return int(value)


def check_update(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
                 ) -> None:
    """Raise ValueError unless every uploaded tensor is a known key of the global shape and
    dtype with finite values; the full reply check is hfedmoe.validation.check_reply."""
    check_tensors(update, global_state)


# --- personalised evaluation and the node's personal state -----------------------------------


def evaluate_instruction(server_round: int, flat_config: Mapping, global_arrays: ArrayRecord,
                         lineage: str = "") -> RecordDict:
    """The evaluate instruction: the same records as the train instruction."""
    return train_instruction(server_round, flat_config, global_arrays, lineage)


parse_evaluate_instruction = parse_train_instruction


@dataclass(frozen=True)
class ClientAccuracy:
    client_id: int
    num_examples: int  # size of the client's own test split
    accuracy: float
    loss: float


def evaluate_reply(client_id: int, num_examples: int, accuracy: float, loss: float
                   ) -> RecordDict:
    return RecordDict({EVALUATION: MetricRecord({
        "client-id": client_id, "num-examples": num_examples,
        "accuracy": float(accuracy), "loss": float(loss)})})


def parse_evaluate_reply(content: RecordDict) -> ClientAccuracy:
    """Decode an evaluate reply; raises ValueError naming the problem if it is malformed
    (a missing key, a negative count, an accuracy outside [0, 1], a non-finite loss)."""
    if EVALUATION not in content.metric_records:
        raise ValueError(f"evaluate reply lacks the '{EVALUATION}' record")
    metrics = content.metric_records[EVALUATION]
    missing = [k for k in EVALUATE_METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"evaluate reply lacks {', '.join(missing)}")
    parsed = ClientAccuracy(int(metrics["client-id"]), int(metrics["num-examples"]),
                            float(metrics["accuracy"]), float(metrics["loss"]))
    if parsed.num_examples < 0:
        raise ValueError(f"evaluate reply: num-examples = {parsed.num_examples} < 0")
    if not 0.0 <= parsed.accuracy <= 1.0:
        raise ValueError(f"evaluate reply: accuracy = {parsed.accuracy} is outside [0, 1]")
    if not np.isfinite(parsed.loss):
        raise ValueError(f"evaluate reply: loss = {parsed.loss} is not finite")
    return parsed


def identity_query(server_round: int) -> RecordDict:
    """Asks a node which client (partition) it is."""
    return RecordDict({PLAN: ConfigRecord({"server-round": server_round})})


def identity_reply(client_id: int) -> RecordDict:
    return RecordDict({IDENTITY: MetricRecord({"client-id": client_id})})


def parse_identity_reply(content: RecordDict) -> int:
    """The client id of an identity reply; raises ValueError if it carries none."""
    if IDENTITY not in content.metric_records or \
            "client-id" not in content.metric_records[IDENTITY]:
        raise ValueError(f"identity reply lacks '{IDENTITY}' / 'client-id'")
    return _integer(content.metric_records[IDENTITY], "client-id")


def personal_state(node_state: RecordDict) -> dict[str, torch.Tensor]:
    """The personal tensors a node stored (empty before its first round)."""
    if PERSONAL not in node_state.array_records:
        return {}
    return from_array_record(node_state.array_records[PERSONAL])


def store_personal_state(node_state: RecordDict, personal: Mapping[str, torch.Tensor]) -> None:
    """Keep ``personal`` in the node's state for its next round (empty: nothing stored)."""
    if personal:
        node_state[PERSONAL] = to_array_record(personal)
    elif PERSONAL in node_state.array_records:
        del node_state[PERSONAL]


# --- split learning (ho-sfl, sfl, zo-sfl) ------------------------------------------------------


@dataclass(frozen=True)
class SplitInstruction:
    server_round: int
    run_config: dict
    phase: str  # SPLIT_PHASES
    seeds: tuple[int, ...]  # the round's direction seeds (perturbed, zo)
    client_part: Mapping[str, torch.Tensor] | None  # theta_c (forward, perturbed)
    cut_gradient: torch.Tensor | None  # lambda (B, T, H) (zo, gradient)


def is_split_instruction(content: RecordDict) -> bool:
    plan = content.config_records.get(PLAN)
    return plan is not None and "phase" in plan


def split_instruction(server_round: int, flat_config: Mapping, phase: str,
                      client_part: ArrayRecord | None = None,
                      cut_gradient: torch.Tensor | None = None,
                      seeds: Sequence[int] = ()) -> RecordDict:
    if phase not in SPLIT_PHASES:
        raise ValueError(f"unknown split phase {phase!r}")
    content = RecordDict({PLAN: ConfigRecord({
        "server-round": server_round,
        "run-config": json.dumps(dict(flat_config), sort_keys=True),
        "phase": phase, "seeds": [int(s) for s in seeds]})})
    if client_part is not None:
        content[CLIENT_PART] = client_part
    if cut_gradient is not None:
        content[CUT_GRADIENT] = to_array_record({"lambda": cut_gradient})
    return content


def parse_split_instruction(content: RecordDict) -> SplitInstruction:
    plan = content.config_records[PLAN]
    phase = str(plan["phase"])
    if phase not in SPLIT_PHASES:
        raise ValueError(f"unknown split phase {phase!r}")
    gradient = (from_array_record(content.array_records[CUT_GRADIENT])["lambda"]
                if CUT_GRADIENT in content.array_records else None)
    return SplitInstruction(
        server_round=int(plan["server-round"]),
        run_config=json.loads(str(plan["run-config"])),
        phase=phase, seeds=tuple(int(s) for s in plan.get("seeds", [])),
        client_part=(ArrayState(content.array_records[CLIENT_PART])
                     if CLIENT_PART in content.array_records else None),
        cut_gradient=gradient)


def split_metrics(client_id: int, num_examples: int, batch_examples: int,
                  peak_memory_bytes: int, seconds: float,
                  process: ProcessMemory | None = None) -> MetricRecord:
    return MetricRecord({
        "client-id": client_id, "num-examples": num_examples, "batch-examples": batch_examples,
        "peak-memory-bytes": int(peak_memory_bytes), "mean-step-seconds": float(seconds),
        **({"process-resident-bytes": process.resident_bytes,
            "process-peak-resident-bytes": process.peak_resident_bytes}
           if process is not None else {})})


@dataclass(frozen=True)
class SplitReply:
    client_id: int
    num_examples: int
    metrics: dict[str, float]
    z: torch.Tensor | None = None  # (B, T, H) (forward, perturbed)
    perturbed: tuple[torch.Tensor, ...] = ()  # P x (B, T, H) (perturbed)
    attention_mask: torch.Tensor | None = None  # (B, T)
    labels: torch.Tensor | None = None  # (B,) or (B, T)
    scalars: tuple[float, ...] = ()  # (zo)
    active: torch.Tensor | None = None  # (L, S) bool: the experts perturbed (active-experts)
    gradient: dict[str, torch.Tensor] = field(default_factory=dict)  # (gradient)
    bytes_up: int = 0


def is_split_reply(content: RecordDict) -> bool:
    """Whether ``content`` answers a split-learning exchange (activations, scalars, or a
    gradient without routing statistics)."""
    return ACTIVATIONS in content.array_records or SCALARS in content.metric_records or (
        UPDATE in content.array_records and ROUTING not in content.metric_records)


def store_split_state(node_state: RecordDict, server_round: int, client_part: ArrayRecord
                      ) -> None:
    """Keep the round's theta_c in the node state for the round's second exchange."""
    node_state[SPLIT_STATE] = client_part
    node_state[SPLIT_STATE + "-round"] = ConfigRecord({"server-round": server_round})


def split_state(node_state: RecordDict, server_round: int) -> ArrayState:
    """theta_c kept by this round's first exchange; raises ValueError when the node holds
    none of this round (its first exchange did not reach it)."""
    kept = node_state.config_records.get(SPLIT_STATE + "-round")
    if kept is None or int(kept["server-round"]) != server_round or \
            SPLIT_STATE not in node_state.array_records:
        raise ValueError(f"no client part of round {server_round} on this node")
    return ArrayState(node_state.array_records[SPLIT_STATE])


def activations_reply(z: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, metrics: MetricRecord,
                      perturbed: Sequence[torch.Tensor] = ()) -> RecordDict:
    arrays = {"z": z, "attention-mask": attention_mask, "labels": labels,
              **{f"z.{p}": value for p, value in enumerate(perturbed)}}
    return RecordDict({ACTIVATIONS: to_array_record(arrays), METRICS: metrics})


def scalars_reply(scalars: Sequence[float], metrics: MetricRecord,
                  active: torch.Tensor | None = None) -> RecordDict:
    """``active``: (L, S) bool, the experts the client perturbed (ho-sfl.active-experts)."""
    record = {"values": [float(v) for v in scalars]}
    if active is not None:
        record["active"] = [int(a) for a in active.reshape(-1)]
    return RecordDict({SCALARS: MetricRecord(record), METRICS: metrics})


def gradient_reply(gradient: Mapping[str, torch.Tensor], metrics: MetricRecord) -> RecordDict:
    return RecordDict({UPDATE: to_array_record(gradient), METRICS: metrics})


def parse_split_reply(content: RecordDict, phase: str, hidden_size: int, max_length: int,
                      directions: int, expert_shape: tuple[int, int] = (0, 0)) -> SplitReply:
    """Decode and check one split-learning reply of ``phase``; raises ValueError naming the
    problem: a missing record or key, a wrong shape (z must be (B, T, hidden_size) with
    T <= max_length, the mask (B, T) of 0/1, labels (B,) or (B, T) of integers), a
    non-finite value, a wrong number of scalars or perturbed activations."""
    if METRICS not in content.metric_records:
        raise ValueError(f"reply lacks the '{METRICS}' record")
    metrics = content.metric_records[METRICS]
    for key in ("client-id", "num-examples"):
        if key not in metrics:
            raise ValueError(f"reply metrics lack {key}")
    base = dict(client_id=_integer(metrics, "client-id"),
                num_examples=_integer(metrics, "num-examples"),
                metrics={k: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if phase in ("forward", "perturbed"):
        if ACTIVATIONS not in content.array_records:
            raise ValueError(f"reply lacks the '{ACTIVATIONS}' record")
        record = content.array_records[ACTIVATIONS]
        arrays = from_array_record(record)
        for key in ("z", "attention-mask", "labels"):
            if key not in arrays:
                raise ValueError(f"activations lack '{key}'")
        z, mask, labels = arrays["z"], arrays["attention-mask"], arrays["labels"]
        if z.dim() != 3 or z.shape[2] != hidden_size or not 1 <= z.shape[1] <= max_length:
            raise ValueError(f"z has shape {tuple(z.shape)}, expected (B, T <= {max_length}, "
                             f"{hidden_size})")
        if tuple(mask.shape) != tuple(z.shape[:2]) or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"attention-mask must be (B, T) = {tuple(z.shape[:2])} of 0/1")
        if labels.dim() not in (1, 2) or labels.shape[0] != z.shape[0] or (
                labels.dim() == 2 and labels.shape[1] != z.shape[1]):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected (B,) or (B, T)")
        if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
            raise ValueError("labels are not integers")
        perturbed = tuple(arrays[f"z.{p}"] for p in range(directions) if f"z.{p}" in arrays)
        if phase == "perturbed" and len(perturbed) != directions:
            raise ValueError(f"{len(perturbed)} perturbed activations, expected {directions}")
        for name, value in (("z", z), *((f"z.{p}", v) for p, v in enumerate(perturbed))):
            if value.shape != z.shape or not bool(torch.isfinite(value).all()):
                raise ValueError(f"'{name}' is not finite or not shaped like z")
        if metrics.get("batch-examples") != z.shape[0]:
            raise ValueError(f"batch-examples {metrics.get('batch-examples')} != the batch of "
                             f"z, {z.shape[0]}")
        return SplitReply(**base, z=z, perturbed=perturbed, attention_mask=mask.long(),
                          labels=labels.long(), bytes_up=record_bytes(record))
    if phase == "zo":
        if SCALARS not in content.metric_records or "values" not in \
                content.metric_records[SCALARS]:
            raise ValueError(f"reply lacks '{SCALARS}' / 'values'")
        record = content.metric_records[SCALARS]
        values = [float(v) for v in record["values"]]
        if len(values) != directions or not all(math.isfinite(v) for v in values):
            raise ValueError(f"expected {directions} finite scalars, got {values}")
        active = _matrix(record, "active", expert_shape) if "active" in record else None
        if active is not None and not bool(((active == 0) | (active == 1)).all()):
            raise ValueError("scalars 'active' has values other than 0 and 1")
        return SplitReply(**base, scalars=tuple(values),
                          active=None if active is None else active.bool(),
                          bytes_up=8 * len(values) + (active.numel() if active is not None
                                                      else 0))
    if phase == "gradient":
        if UPDATE not in content.array_records:
            raise ValueError(f"reply lacks the '{UPDATE}' record")
        record = content.array_records[UPDATE]
        return SplitReply(**base, gradient=from_array_record(record),
                          bytes_up=record_bytes(record))
    raise ValueError(f"unknown split phase {phase!r}")
