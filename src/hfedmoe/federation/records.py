"""The message schema: every record key and codec of hfedmoe's Flower messages lives here.

Train instruction (server -> client), message type ``train``:
  ``"global"``  ArrayRecord  - the global trainable tensors, flat keys (hfedmoe.model.state)
  ``"plan"``    ConfigRecord - ``server-round``, ``budget-experts``, ``run-config`` (the resolved
                               run configuration as JSON, parsed again by hfedmoe.config)
Train reply (client -> server):
  ``"update"``  ArrayRecord  - the tensors the client uploads (any subset of the global keys)
  ``"metrics"`` MetricRecord - ``num-examples``, ``client-id``, ``train-loss``,
                               ``budget-experts``, ``max-active-experts-per-batch``,
                               ``peak-memory-bytes``, ``mean-step-seconds``
  ``"routing"`` MetricRecord - ``usage``: u_c(e) flattened row-major from (L, S)

Arrays travel as float32 numpy arrays (Flower's ArrayRecord rejects bfloat16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from hfedmoe.aggregation import ClientUpdate
from hfedmoe.strategies.base import ClientPlan
from hfedmoe.training import LocalTrainingResult

GLOBAL, PLAN, UPDATE, METRICS, ROUTING = "global", "plan", "update", "metrics", "routing"
REPLY_METRIC_KEYS = ("num-examples", "client-id", "train-loss", "budget-experts",
                     "max-active-experts-per-batch", "peak-memory-bytes", "mean-step-seconds")


def to_array_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().to("cpu", torch.float32).numpy()) for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord as serialised (what travels)."""
    return sum(len(array.data) for array in record.values())


@dataclass(frozen=True)
class TrainInstruction:
    server_round: int
    plan: ClientPlan
    run_config: dict  # flat resolved configuration
    global_state: dict[str, torch.Tensor]


def train_instruction(server_round: int, plan: ClientPlan, flat_config: Mapping,
                      global_arrays: ArrayRecord) -> RecordDict:
    config = ConfigRecord({
        "server-round": server_round,
        "budget-experts": plan.budget_experts,
        "run-config": json.dumps(dict(flat_config), sort_keys=True),
    })
    return RecordDict({GLOBAL: global_arrays, PLAN: config})


def parse_train_instruction(content: RecordDict) -> TrainInstruction:
    plan = content.config_records[PLAN]
    return TrainInstruction(
        server_round=int(plan["server-round"]),
        plan=ClientPlan(budget_experts=int(plan["budget-experts"])),
        run_config=json.loads(str(plan["run-config"])),
        global_state=from_array_record(content.array_records[GLOBAL]),
    )


def train_reply(client_id: int, budget_experts: int, upload: Mapping[str, torch.Tensor],
                result: LocalTrainingResult) -> RecordDict:
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "client-id": client_id,
        "train-loss": result.train_loss,
        "budget-experts": budget_experts,
        "max-active-experts-per-batch": result.max_active_experts_per_batch,
        "peak-memory-bytes": result.peak_memory_bytes,
        "mean-step-seconds": result.mean_step_seconds,
    })
    routing = MetricRecord({"usage": [float(u) for u in result.usage.reshape(-1)]})
    return RecordDict({UPDATE: to_array_record(upload), METRICS: metrics, ROUTING: routing})


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
    usage = torch.tensor(list(content.metric_records[ROUTING]["usage"]), dtype=torch.float32)
    if usage.numel() != usage_shape[0] * usage_shape[1]:
        raise ValueError(f"reply usage has {usage.numel()} values, expected {usage_shape}")
    return ClientUpdate(
        client_id=int(metrics["client-id"]),
        num_examples=int(metrics["num-examples"]),
        state=from_array_record(content.array_records[UPDATE]),
        usage=usage.reshape(usage_shape),
        metrics={k: float(metrics[k]) for k in REPLY_METRIC_KEYS},
    )
