"""From a built model to the numbers of the budget cost model (hfedmoe.budget).

A device profile (memory, speed) becomes C_budget through ``budget_from_profile``, which needs
the bytes of one trainable expert and the bytes of everything else in training. This module
reads those from the adapter. The base is an ESTIMATE (the measured peak memory of each run is
reported separately, per client):

    base_bytes = all parameter bytes (experts' weights included, trained or not)
               + gradient and AdamW moments of the non-expert trainables (routers, head, ...)
               + activations outside the experts: ``ACTIVATION_FLOATS_PER_TOKEN_LAYER`` floats
                 per token per MoE layer (attention scores, norms, residual stream)

and one trainable expert adds its gradient, AdamW moments and activations (its weights are
already in the base).

With ``train.adapter = "lora"`` (docs/lora.md, "Budgets for LoRA clients") an expert's
trainable tensors are its factors: gradient and moments are the factors' bytes, and its
activations add r floats per token per projection (the factors' inner product, kept for B's
gradient). Parameter bytes are counted as held: a quantized base (``model.quantization``) at
its packed size, plus the float32 copy of one layer's experts' projection that the grouped
product dequantizes at a time (hfedmoe.model.quantize; for a float base the stacked copy).
"""

from __future__ import annotations

from dataclasses import replace

from hfedmoe.budget import ExpertCost, expert_cost, resolve_budget
from hfedmoe.calibration import Calibration
from hfedmoe.config import RunConfig
from hfedmoe.measurement import tensor_bytes
from hfedmoe.model.adapter import MoEAdapter

ACTIVATION_FLOATS_PER_TOKEN_LAYER = 16  # x hidden size; an estimate for a transformer block
LOGIT_COPIES = 3  # causal-lm: logits, their float32 log-softmax and its gradient (B*T x V each)


def training_costs(adapter: MoEAdapter, config: RunConfig) -> tuple[ExpertCost, int]:
    """(cost of one more trainable expert, base bytes) for batches of ``config.train``.

    The expert's size (its own weights) sets its activations; its trainable tensors set the
    gradient and AdamW-moment bytes: the weights themselves, or with ``train.adapter =
    "lora"`` its factors (hfedmoe.model.lora; their own small activations are not counted)."""
    geometry = adapter.geometry
    expert = list(adapter.expert_weights(0, 0).items())  # logical (dequantized) shapes
    params_per_expert = sum(p.numel() for _, p in expert)
    trainable = adapter.expert_parameters(0, 0)
    trainable_bytes = tensor_bytes(trainable.values())
    hidden = adapter.model.backbone.get_input_embeddings().embedding_dim
    gated = any("gate" in name for name, _ in expert)
    intermediate = max(1, params_per_expert // ((3 if gated else 2) * hidden))
    tokens = config.train.batch_size * config.model.max_length
    cost = expert_cost(params_per_expert, hidden, intermediate, tokens, geometry.top_k,
                       geometry.num_experts, gated=gated)
    # LoRA: r floats per routed token per factor pair (A's output, kept for B's gradient)
    ranks = [p.shape[0] for name, p in trainable.items() if name.endswith(".A")]
    ranks += [p.shape[1] for name, p in trainable.items()  # frozen A: B (out, r) only
              if name.endswith(".B") and name[:-2] + ".A" not in trainable]
    routed_tokens = -(-tokens * geometry.top_k // geometry.num_experts)
    cost = replace(cost, param_bytes=0,  # weights are counted in the base
                   grad_bytes=trainable_bytes, optimizer_bytes=2 * trainable_bytes,
                   activation_bytes=cost.activation_bytes + 4 * routed_tokens * sum(ranks))
    non_expert = [p for layer in range(geometry.num_layers)
                  for p in adapter.router_parameters(layer).values()]
    non_expert += list(adapter.non_expert_parameters(config.model.trainable_non_expert).values())
    lm_head = getattr(adapter.model, "lm_head", None)  # causal-lm: (tokens, V) logits
    vocab = lm_head.out_features if lm_head is not None else 0
    # a frozen base's grouped products hold one projection of one layer's experts in float32
    workspace = (geometry.num_experts * max((p.numel() for _, p in expert), default=0) * 4
                 if config.train.adapter == "lora" else 0)
    # attention factors (lora.targets = "experts+attention"): each keeps its input (tokens, in)
    # for A's gradient and A's output (tokens, r) for B's (an upper bound: q, k, v share one input)
    attention = sum(4 * tokens * (f.A.shape[0] + f.A.shape[1])
                    for f in adapter.attention_factors().values())
    base = (tensor_bytes(adapter.model.parameters()) + workspace + attention
            + 3 * tensor_bytes(non_expert)
            + 4 * tokens * hidden * ACTIVATION_FLOATS_PER_TOKEN_LAYER * geometry.num_layers
            + LOGIT_COPIES * 4 * tokens * vocab)
    return cost, base


def client_budget(adapter: MoEAdapter, config: RunConfig, client_id: int,
                  node_budget: str | int | None = None,
                  calibration: Calibration | None = None) -> int:
    """C_budget of ``client_id``: from its node config (deployment) or the run config; at
    least the model's top-k (see hfedmoe.budget.resolve_budget). Device profiles go through
    ``calibration`` (the run's ``budget.calibration``) when given, else the estimate above."""
    cost, base = training_costs(adapter, config)
    geometry = adapter.geometry
    return resolve_budget(config.budget.experts, client_id, node_budget,
                          total_experts=geometry.total_experts, cost=cost, base_bytes=base,
                          min_budget=min(geometry.top_k, geometry.total_experts),
                          calibration=calibration)
