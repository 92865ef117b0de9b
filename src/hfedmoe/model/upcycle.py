"""Dense pretrained BERT -> MoE conversion ("upcycling"), in place.

Each BertLayer's FFN ``LayerNorm(dropout(W2·gelu(W1·x + b1) + b2) + x)`` (x = attention
output) is split along its I intermediate neurons into S experts of I/S neurons each:
expert e = ``down_e(gelu(up_e(x)))`` with ``up_e = (W1[n_e], b1[n_e])`` and
``down_e = W2[:, n_e]`` (no bias). A router picks top_k experts per token; the layer becomes

    LayerNorm(dropout(Σ_{e ∈ top_k} g_e · expert_e(x) + b2) + x),   Σ g_e = top_k.

Invariant (exactness): with top_k = S and a uniform router every gate g_e is 1 and the
layer computes the dense FFN exactly (up to float summation order), for ANY neuron split.
See docs/upcycling.md for the split and router-initialisation choices and measurements.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from transformers import BertModel
from transformers.activations import ACT2FN

from hfedmoe.model.lora import grouped_lora_delta, lora_linear
from hfedmoe.model.sparse_experts import SparseExperts, grouped_linear, grouped_row_biases


class DenseActExpert(nn.Module):
    """One expert: a slice of a dense FFN's neurons. (tokens, H) -> (tokens, H)."""

    def __init__(self, hidden_size: int, expert_size: int, hidden_act: str) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, expert_size, bias=True)
        self.act = ACT2FN[hidden_act]
        self.down = nn.Linear(expert_size, hidden_size, bias=False)
        self.lora = nn.ModuleDict()  # per-projection LoRA factors (hfedmoe.model.lora)

    def lora_targets(self) -> dict[str, nn.Parameter]:
        """The projections LoRA adapts, by name: weight (out, in); ``up``'s bias stays frozen."""
        return {"up": self.up.weight, "down": self.down.weight}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if len(self.lora):
            hidden = lora_linear(hidden_states, self.up.weight, self.lora["up"]) + self.up.bias
            return lora_linear(self.act(hidden), self.down.weight, self.lora["down"])
        return self.down(self.act(self.up(hidden_states)))  # (tokens, H)

    @staticmethod
    def grouped_forward(experts: Sequence["DenseActExpert"], x: torch.Tensor,
                        sizes: "Sequence[int] | torch.Tensor") -> torch.Tensor:
        """Each expert's forward on its block of rows of ``x`` (n, H), ``sizes[i]`` rows for
        ``experts[i]``, as two grouped matrix products (two more per projection with LoRA
        factors, hfedmoe.model.lora). (n, H)."""
        lora = len(experts[0].lora) > 0
        bias = grouped_row_biases([e.up.bias for e in experts], x, sizes)  # (n, m)
        # the weights as functions: read again in the backward when frozen (LoRA), not kept
        hidden = grouped_linear(x, lambda: [e.up.weight for e in experts], sizes) + bias  # (n, m)
        if lora:
            hidden = hidden + grouped_lora_delta(x, [e.lora["up"] for e in experts], sizes,
                                                 grouped_linear)
        hidden = experts[0].act(hidden)
        out = grouped_linear(hidden, lambda: [e.down.weight for e in experts], sizes)  # (n, H)
        if lora:
            out = out + grouped_lora_delta(hidden, [e.lora["down"] for e in experts], sizes,
                                           grouped_linear)
        return out


class UpcycledRouter(nn.Module):
    """Linear top-k router, ``weight`` (S, H), no bias.

    Returns the transformers fused-router triple ``(router_logits (T,S), top_k_weights
    (T,k), top_k_index (T,k))`` with ``top_k_weights = k · softmax(chosen k logits)``:
    the gates of a token sum to k, and a uniform router gives every chosen gate exactly 1.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (num_experts), got {top_k}")
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(
        self, hidden_states: torch.Tensor  # (T, H)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = nn.functional.linear(hidden_states, self.weight)  # (T, S)
        top_logits, top_k_index = torch.topk(router_logits, self.top_k, dim=-1)  # (T, k)
        top_k_weights = self.top_k * torch.softmax(top_logits, dim=-1)  # (T, k), rows sum to k
        return router_logits, top_k_weights, top_k_index


class UpcycledMoE(nn.Module):
    """Router + expert bank replacing ``BertLayer.intermediate``. (B, T, H) -> (B, T, H).

    The output is Σ g_e · expert_e(x) WITHOUT the dense output bias b2, which stays in the
    layer as :class:`OutputBias` (a non-expert parameter).
    """

    def __init__(self, gate: UpcycledRouter, experts: SparseExperts) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)  # (B*T, H)
        _, top_k_weights, top_k_index = self.gate(flat)
        out = self.experts(flat, top_k_index, top_k_weights)  # (B*T, H)
        return out.reshape(batch, seq_len, hidden)


class OutputBias(nn.Module):
    """Stands in for ``BertOutput.dense``: adds the dense FFN's output bias b2."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.bias  # (..., H)


def contiguous_neuron_groups(intermediate_size: int, num_experts: int) -> torch.Tensor:
    """Expert e owns neurons ``e·m .. (e+1)·m - 1``, m = I/S. Returns (S, m) int64."""
    if num_experts < 1 or intermediate_size % num_experts:
        raise ValueError(
            f"num_experts must divide the FFN size {intermediate_size}, got {num_experts}"
        )
    return torch.arange(intermediate_size).reshape(num_experts, -1)


def _balanced_assignment(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each neuron to one expert, ``capacity`` neurons per expert, by score.

    Rounds of proposals: every unassigned neuron proposes to its best expert that is not
    full; an expert keeps its highest-scoring proposals up to its free capacity. Each round
    fills at least one expert or assigns everyone, so at most S rounds. ``scores`` (I, S)
    -> groups (S, capacity) int64, rows sorted. Deterministic (stable sorts).
    """
    num_neurons, num_experts = scores.shape
    owner = torch.full((num_neurons,), -1, dtype=torch.long)  # (I,)
    filled = [0] * num_experts
    for _ in range(num_experts):
        unassigned = owner < 0  # (I,)
        if not unassigned.any():
            break
        full = torch.tensor([count == capacity for count in filled])  # (S,)
        choice = scores.masked_fill(full, float("-inf")).argmax(dim=1)  # (I,)
        for expert in range(num_experts):
            proposals = torch.nonzero(unassigned & (choice == expert)).flatten()
            order = scores[proposals, expert].argsort(descending=True, stable=True)
            accepted = proposals[order[: capacity - filled[expert]]]
            owner[accepted] = expert
            filled[expert] += len(accepted)
    return torch.stack([torch.nonzero(owner == e).flatten() for e in range(num_experts)])


def clustered_neuron_groups(
    up_weight: torch.Tensor, num_experts: int, max_iterations: int = 10
) -> torch.Tensor:
    """Balanced spherical k-means of the FFN's input weights W1 (I, H) -> groups (S, I/S).

    Neurons whose input weight vectors point the same way fire on the same inputs, so each
    expert becomes a coherent block (MoEfication's parameter-clustering split). Data-free
    and deterministic: float64, starts from the contiguous split, ties broken by index.
    """
    groups = contiguous_neuron_groups(up_weight.shape[0], num_experts)
    directions = nn.functional.normalize(up_weight.detach().double(), dim=1)  # (I, H)
    for _ in range(max_iterations):
        centroids = nn.functional.normalize(directions[groups].mean(dim=1), dim=1)  # (S, H)
        new_groups = _balanced_assignment(directions @ centroids.T, groups.shape[1])
        if torch.equal(new_groups, groups):
            break
        groups = new_groups
    return groups


def ffn_input_means(
    bert: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[torch.Tensor]:
    """Mean FFN input (attention output) of each layer over the non-padding tokens. [(H,)]

    Runs one no-grad forward pass of ``bert`` (still dense) in eval mode; the train/eval
    mode is restored afterwards.
    """
    captured: list[torch.Tensor] = []
    hooks = [
        layer.intermediate.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        for layer in bert.encoder.layer
    ]
    was_training = bert.training
    try:
        with torch.no_grad():
            bert.eval()(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        bert.train(was_training)
        for hook in hooks:
            hook.remove()
    keep = attention_mask.bool()  # (B, T)
    return [hidden[keep].float().mean(dim=0) for hidden in captured]  # each (H,)


def router_weight_from_groups(
    up_weight: torch.Tensor, groups: torch.Tensor, input_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """Router row e = expert e's mean input weight, de-biased and unit-normalised. (S, H).

    FFN inputs share a large common component ``input_mean``; its dot product with the
    un-normalised mean rows (the "naive" init) is a per-expert constant that sends most
    tokens to a few experts. Removing the rows' component along ``input_mean`` (when given)
    and normalising them leaves routing to the token-specific part of the input.
    """
    rows = up_weight.detach().float()[groups].mean(dim=1)  # (S, H)
    if input_mean is not None:
        direction = nn.functional.normalize(input_mean.float(), dim=0)  # (H,)
        rows = rows - (rows @ direction)[:, None] * direction
    return nn.functional.normalize(rows, dim=1)


def experts_from_dense(
    up: nn.Linear, down: nn.Linear, groups: torch.Tensor, hidden_act: str
) -> list[DenseActExpert]:
    """Copy each group's rows of W1/b1 and columns of W2 into its own expert."""
    hidden_size, expert_size = up.in_features, groups.shape[1]
    experts = []
    for neurons in groups:  # (m,)
        expert = DenseActExpert(hidden_size, expert_size, hidden_act)
        with torch.no_grad():
            expert.up.weight.copy_(up.weight[neurons])  # (m, H)
            expert.up.bias.copy_(up.bias[neurons])  # (m,)
            expert.down.weight.copy_(down.weight[:, neurons])  # (H, m)
        experts.append(expert)
    return experts


def upcycle_layer(
    layer: nn.Module,
    layer_index: int,
    groups: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    hidden_act: str,
) -> UpcycledMoE:
    """Replace one BertLayer's FFN by experts ``groups`` (S, m) and a router, in place.

    ``layer.intermediate`` becomes the :class:`UpcycledMoE` and ``layer.output.dense`` an
    :class:`OutputBias` holding b2; dropout and LayerNorm of ``layer.output`` are kept.
    """
    up, down = layer.intermediate.dense, layer.output.dense
    experts = experts_from_dense(up, down, groups, hidden_act)
    gate = UpcycledRouter(up.in_features, groups.shape[0], top_k)
    with torch.no_grad():
        gate.weight.copy_(router_weight)
    moe = UpcycledMoE(gate, SparseExperts(experts, layer_index=layer_index))
    layer.intermediate = moe
    layer.output.dense = OutputBias(down.bias)
    return moe


def upcycle_bert(
    bert: BertModel,
    num_experts: int,
    top_k: int,
    calibration: Mapping[str, torch.Tensor] | None = None,
) -> list[UpcycledMoE]:
    """Convert every FFN of ``bert`` into an MoE in place; return the MoE blocks by layer.

    Split: :func:`clustered_neuron_groups`; router: :func:`router_weight_from_groups`, with
    the mean FFN inputs measured on ``calibration`` (``input_ids``/``attention_mask`` of a
    few real texts) when given, else data-free. Parameter names per layer:
    ``intermediate.gate.weight``, ``intermediate.experts.experts.{e}.up.{weight,bias}``,
    ``intermediate.experts.experts.{e}.down.weight`` and ``output.dense.bias`` (b2, the
    dense model's name). Deterministic: no randomness is used.
    """
    config = bert.config
    if not isinstance(config.hidden_act, str):
        raise ValueError(f"hidden_act must be a named activation, got {config.hidden_act!r}")
    contiguous_neuron_groups(config.intermediate_size, num_experts)  # validates num_experts
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts} (num_experts), got {top_k}")
    layers = list(bert.encoder.layer)
    for layer_index, layer in enumerate(layers):
        if isinstance(layer.intermediate, UpcycledMoE):
            raise ValueError(f"layer {layer_index} is already upcycled")
    means: list[torch.Tensor | None] = [None] * len(layers)
    if calibration is not None:
        means = ffn_input_means(bert, calibration["input_ids"], calibration["attention_mask"])
    blocks = []
    for layer_index, (layer, mean) in enumerate(zip(layers, means)):
        up_weight = layer.intermediate.dense.weight
        groups = clustered_neuron_groups(up_weight, num_experts)
        router_weight = router_weight_from_groups(up_weight, groups, mean)
        blocks.append(
            upcycle_layer(layer, layer_index, groups, router_weight, top_k, config.hidden_act)
        )
    return blocks
