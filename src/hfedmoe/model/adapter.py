"""The MoE adapter protocol: the one interface through which the rest of hfedmoe sees a model.

Everything outside ``hfedmoe.model`` addresses experts as ``(layer, expert)``, where
``layer`` counts MoE layers only (0 .. L-1, dense layers skipped) and ``expert`` counts
routed experts (0 .. S-1). No module or parameter name of any transformers family appears
outside this package.

Internal representation (every family): each MoE layer's experts are held as SEPARATE
per-expert ``nn.Module``s inside a :class:`hfedmoe.model.sparse_experts.SparseExperts`
bank, so that each expert has its own ``nn.Parameter``s. Consequences the rest of the code
relies on:

* an expert that receives no gradient keeps ``.grad is None``; ``torch.optim.AdamW``
  then skips it entirely (no state, no update, no weight decay) - inactive experts stay
  bit-identical and cost no gradient or optimizer memory (state from an earlier batch of
  the round: a budgeted client drops it with ``budget.optimizer-state = "batch"``, the
  default; ``"round"`` and full training keep it);
* an expert's tensors can be read or written by ``(layer, expert)`` without slicing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from hfedmoe.model.lora import LoRASettings


@dataclass(frozen=True)
class MoEGeometry:
    num_layers: int  # L: MoE layers (dense FFN layers are not counted)
    num_experts: int  # S: routed experts per MoE layer
    top_k: int  # routed experts per token

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts


@dataclass
class RoutingTrace:
    """Router outputs of ONE forward pass, one entry per MoE layer, in layer order.

    ``probabilities[l]``: (tokens, S) float32 router probabilities G_e(x) for every token of
    the batch (padding included, tokens = batch * seq_len, row-major like
    ``input_ids.reshape(-1)``). They stay attached to the autograd graph so a
    load-balancing loss can be built from them; detach before using them as statistics.
    ``top_k_index[l]``: (tokens, k) int64 experts each token was routed to; the value S
    marks a dropped slot (SwitchTransformers' capacity overflow).
    """

    probabilities: list[torch.Tensor] = field(default_factory=list)
    top_k_index: list[torch.Tensor] = field(default_factory=list)


@dataclass
class BackwardPlan:
    """Which experts take part in the coming backward pass (HFedMoE Eq. 15).

    Set ``active`` (an (L, S) bool tensor) AFTER the forward pass and BEFORE
    ``loss.backward()``. Routed experts that are not active contribute their forward
    output as a constant: their parameters get no gradient (``.grad`` stays None), their
    input gets no gradient through them, no backward compute runs for them and none of
    their intermediate activations are kept. ``active = None`` at backward time means every
    routed expert is trained.
    """

    active: torch.Tensor | None = None  # (L, S) bool


@dataclass
class OnlinePlan:
    """Which experts learn from the current batch, decided layer by layer DURING the forward
    (one-pass budgeted experts; ``budget.mode = "one-pass"``).

    Each MoE layer's expert bank calls ``choose(layer)`` right after its router ran (the
    router's output is already in the routing trace) and gets an (S,) bool mask: those routed
    experts run with grad; the other routed experts run once without grad, their output a
    constant (their parameters get no gradient, their input none through them, and none of
    their activations are kept), still weighted by the router, which learns from them. The
    banks record each layer's mask in ``chosen`` (index = layer).
    """

    choose: Callable[[int], torch.Tensor]  # MoE layer l -> (S,) bool
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)

    def active(self, num_layers: int, num_experts: int) -> torch.Tensor:
        """The (L, S) bool masks chosen so far (layers never reached: none active)."""
        mask = torch.zeros(num_layers, num_experts, dtype=torch.bool)
        for layer, chosen in self.chosen.items():
            mask[layer] = chosen.cpu()
        return mask


class MoEAdapter(Protocol):
    """What every model family exposes. Implementations live in ``hfedmoe.model``."""

    family: str  # e.g. "qwen2_moe", "switch_transformers", "minilm-moe"
    geometry: MoEGeometry
    model: nn.Module  # a classifier: model(input_ids (B,T), attention_mask (B,T)) -> logits (B, C)

    def expert_parameters(self, layer: int, expert: int) -> Mapping[str, nn.Parameter]:
        """The live trainable parameters of one expert, by short name (e.g.
        ``"gate_up_proj"``; its LoRA factors ``"lora.gate_up_proj.A"``, ... when it has some)."""
        ...

    def router_parameters(self, layer: int) -> Mapping[str, nn.Parameter]:
        """The live parameters of one layer's router (gate), by short name."""
        ...

    def expert_weights(self, layer: int, expert: int) -> Mapping[str, nn.Parameter]:
        """One expert's own weights (trainable or, with LoRA factors, frozen), by short name."""
        ...

    def attach_lora(self, settings: "LoRASettings", seed: int, attention: bool = False) -> None:
        """Give every routed expert its own LoRA factors (hfedmoe.model.lora); they become
        the experts' parameters in :meth:`expert_parameters`. ``attention``: the attention
        projections get factors too, among :meth:`non_expert_parameters`."""
        ...

    def attention_factors(self) -> "Mapping[str, nn.Module]":
        """The attention projections' LoRAFactors by projection name (empty if none)."""
        ...

    def quantize_experts(self, scheme: str) -> None:
        """Hold the routed experts' frozen projection weights quantized (hfedmoe.model.quantize)."""
        ...

    def merge_lora(self) -> None:
        """Fold any LoRA factors into the expert weights and drop them (export)."""
        ...

    def non_expert_parameters(self, scope: str) -> Mapping[str, nn.Parameter]:
        """Trainable parameters that are neither routed experts nor routers.

        ``scope="head"``: the classifier head only. ``scope="all"``: every other
        parameter except the input embeddings (shared experts, attention, norms, head).
        Names are stable across processes (the model's own parameter names).
        """
        ...

    def trace_routing(self) -> AbstractContextManager[RoutingTrace]:
        """Record the router outputs of every forward pass run inside the block."""
        ...

    def deferred_expert_backward(self) -> AbstractContextManager[BackwardPlan]:
        """Forward passes inside the block defer each routed expert's backward to a plan."""
        ...

    def budgeted_experts(self, choose: Callable[[int], torch.Tensor]
                         ) -> AbstractContextManager[OnlinePlan]:
        """Forward passes inside the block train only the experts ``choose(layer)`` picks
        right after each router (:class:`OnlinePlan`)."""
        ...
