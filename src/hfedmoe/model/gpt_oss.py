"""GPT-OSS's experts layout: transposed, interleaved gate/up, biases and a clamped SwiGLU.

transformers 5.23's ``GptOssExperts`` stores every expert in ``gate_up_proj`` (S, H, 2I) and
``down_proj`` (S, I, H) - transposed against the other families - with biases
``gate_up_proj_bias`` (S, 2I) and ``down_proj_bias`` (S, H); gate and up are interleaved
(columns 0, 2, 4, ... are the gate, 1, 3, 5, ... the up projection) and the activation is its
own (``GptOssExperts._apply_gate``)::

    gate = min(g, limit);  up = clamp(u, -limit, limit)
    out  = W_down ((up + 1) * gate * sigmoid(alpha * gate)) + b_down

:class:`BiasedInterleavedExpert` holds one expert's slices in the (out, in) orientation of the
other banks (so LoRA factors and the grouped products work unchanged) and computes exactly that
function; :meth:`BiasedInterleavedExpert.fused_tensors` gives the slices back in GPT-OSS's own
layout for the export. Its router (``GptOssTopKRouter``: a linear layer with a bias, top-k of the
logits, softmax over the k chosen) returns ``(router_logits, top_k_weights, top_k_index)`` like
the other families', so G_e(x) = softmax(router_logits) (hfedmoe.model.hf_moe).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hfedmoe.model.lora import grouped_lora_delta, lora_linear
from hfedmoe.model.sparse_experts import SparseExperts, grouped_linear, grouped_row_biases

# the layout flags of transformers' @use_experts_implementation for GptOssExperts
GPT_OSS_LAYOUT = {"has_gate": True, "has_bias": True, "is_transposed": True,
                  "is_concatenated": False, "has_post_expert_norm": False}


def is_gpt_oss_layout(experts: nn.Module) -> bool:
    """Whether a fused experts module has GPT-OSS's layout and activation parameters."""
    flags = {name: getattr(experts, name, None) for name in GPT_OSS_LAYOUT}
    return flags == GPT_OSS_LAYOUT and all(hasattr(experts, a) for a in ("alpha", "limit"))


class BiasedInterleavedExpert(nn.Module):
    """One GPT-OSS expert (module docstring): ``gate_up_proj`` (2I, H), ``gate_up_proj_bias``
    (2I,), ``down_proj`` (H, I), ``down_proj_bias`` (H,); (tokens, H) -> (tokens, H)."""

    def __init__(self, gate_up_proj: torch.Tensor, gate_up_bias: torch.Tensor,
                 down_proj: torch.Tensor, down_bias: torch.Tensor, alpha: float, limit: float,
                 requires_grad: bool = True) -> None:
        super().__init__()

        def own(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().clone().contiguous(), requires_grad=requires_grad)

        self.gate_up_proj = own(gate_up_proj.T)  # (2I, H) from GPT-OSS's (H, 2I)
        self.gate_up_proj_bias = own(gate_up_bias)
        self.down_proj = own(down_proj.T)  # (H, I) from (I, H)
        self.down_proj_bias = own(down_bias)
        self.alpha, self.limit = float(alpha), float(limit)
        self.lora = nn.ModuleDict()  # per-projection LoRA factors (hfedmoe.model.lora)

    def lora_targets(self) -> dict[str, torch.Tensor]:
        """The projections LoRA adapts, by name: weight (out, in); the biases stay frozen."""
        return {"gate_up_proj": self.gate_up_proj, "down_proj": self.down_proj}

    def fused_tensors(self) -> dict[str, torch.Tensor]:
        """This expert's slices in GPT-OSS's fused layout, by the fused tensor's name."""
        return {"gate_up_proj": self.gate_up_proj.detach().T,
                "gate_up_proj_bias": self.gate_up_proj_bias.detach(),
                "down_proj": self.down_proj.detach().T,
                "down_proj_bias": self.down_proj_bias.detach()}

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """GPT-OSS's clamped SwiGLU of the interleaved (t, 2I) -> (t, I)."""
        gate = gate_up[..., ::2].clamp(min=None, max=self.limit)
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        factors = self.lora
        gate_up = lora_linear(hidden_states, self.gate_up_proj, factors["gate_up_proj"]
                              if "gate_up_proj" in factors else None) + self.gate_up_proj_bias
        return lora_linear(self.activation(gate_up), self.down_proj, factors["down_proj"]
                           if "down_proj" in factors else None) + self.down_proj_bias

    @staticmethod
    def grouped_forward(experts: Sequence["BiasedInterleavedExpert"], x: torch.Tensor,
                        sizes: "Sequence[int] | torch.Tensor") -> torch.Tensor:
        """Each expert's forward on its block of rows of ``x`` (n, H), ``sizes[i]`` rows for
        ``experts[i]``: two grouped products, biases per row. (n, H)."""
        lora = len(experts[0].lora) > 0
        gate_up = grouped_linear(x, lambda: [e.gate_up_proj for e in experts], sizes)
        gate_up = gate_up + grouped_row_biases([e.gate_up_proj_bias for e in experts], x, sizes)
        if lora:
            gate_up = gate_up + grouped_lora_delta(x, [e.lora["gate_up_proj"] for e in experts],
                                                   sizes, grouped_linear)
        hidden = experts[0].activation(gate_up)  # (n, I)
        out = grouped_linear(hidden, lambda: [e.down_proj for e in experts], sizes)
        out = out + grouped_row_biases([e.down_proj_bias for e in experts], x, sizes)
        if lora:
            out = out + grouped_lora_delta(hidden, [e.lora["down_proj"] for e in experts],
                                           sizes, grouped_linear)
        return out


def bank_from_gpt_oss(experts: nn.Module, layer_index: int) -> SparseExperts:
    """Per-expert copies of a GPT-OSS experts module's slices, as a bank for MoE layer
    ``layer_index``."""
    gate_up, down = experts.gate_up_proj, experts.down_proj  # (S, H, 2I), (S, I, H)
    return SparseExperts(
        [BiasedInterleavedExpert(gate_up[e], experts.gate_up_proj_bias[e], down[e],
                                 experts.down_proj_bias[e], experts.alpha, experts.limit,
                                 gate_up.requires_grad)
         for e in range(gate_up.shape[0])],
        layer_index=layer_index,
    )
