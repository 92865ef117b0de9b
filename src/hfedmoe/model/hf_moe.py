"""transformers 5.x families with FUSED experts: Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V3,
and every other family whose MoE block has the same structure (:func:`moe_blocks`: GraniteMoE,
PhiMoE, Qwen3-Next, GLM-4-MoE, DeepSeek-V2, ... recognised by structure, not by name).

Their MoE block (``layers[i].mlp``; other families name it ``block_sparse_moe`` or
``feed_forward``) holds a router ``gate`` or ``router`` (forward returns
``(router_logits (T,S), top_k_weights (T,k), top_k_index (T,k))``) and an ``experts`` module
storing every expert in two tensors, ``gate_up_proj`` (S, 2I, H) and ``down_proj`` (S, H, I).
:func:`convert_fused_experts` replaces ``experts`` IN PLACE by a :class:`SparseExperts` bank
of :class:`GatedExpert` modules holding copies of the slices, so the block's own forward
(router -> ``experts(hidden, top_k_index, top_k_weights)``) runs unchanged and computes the
same function. Dense layers (Qwen's ``mlp_only_layers``, DeepSeek's first
``first_k_dense_replace`` layers) keep their MLP and are not MoE layers.

Shared experts (Qwen2-MoE ``shared_expert`` + ``shared_expert_gate``, DeepSeek-V3
``shared_experts``) are ordinary non-expert parameters.

Router probabilities G_e(x) (method.md, section 1):

* softmax families: ``softmax(router_logits)``, exactly what their router ranks;
* DeepSeek-V3 (and the other :data:`SIGMOID_SCORED` families): its router scores experts
  with ``sigmoid(router_logits)`` (top-k inside the best ``topk_group`` of ``n_group``
  groups, after adding ``e_score_correction_bias``).
  We define ``G_e(x) = sigmoid(l_e) / Σ_j sigmoid(l_j)`` - the sigmoid scores normalised
  to a distribution over experts, without the bias (which is a load-balancing device, not
  a preference). ``e_score_correction_bias`` is a buffer, not a router parameter: it keeps
  its loaded value and is not exchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig

from hfedmoe.model.generic import RoutingFn, UnsupportedModelError
from hfedmoe.model.gpt_oss import bank_from_gpt_oss, is_gpt_oss_layout
from hfedmoe.model.lora import grouped_lora_delta, lora_linear
from hfedmoe.model.sparse_experts import SparseExperts, grouped_linear

FUSED_FAMILIES = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v3")
DROPOUT_KEYS = ("attention_dropout",)  # the only dropout these configs have

BASE_MODELS: dict[str, type[transformers.PreTrainedModel]] = {
    "qwen2_moe": transformers.Qwen2MoeModel,
    "qwen3_moe": transformers.Qwen3MoeModel,
    "olmoe": transformers.OlmoeModel,
    "mixtral": transformers.MixtralModel,
    "deepseek_v3": transformers.DeepseekV3Model,
}

# The layout flags set by transformers' ``@use_experts_implementation`` that we support.
_SUPPORTED_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False,
                     "is_concatenated": True, "has_post_expert_norm": False}


class GatedExpert(nn.Module):
    """One routed expert: ``down_proj · (act(g) ⊙ u)`` with ``[g; u] = gate_up_proj · x``.

    ``gate_up_proj`` (2I, H), ``down_proj`` (H, I); (tokens, H) -> (tokens, H). Same
    arithmetic as the fused modules' eager path, so outputs match bit for bit; the bank runs
    :meth:`grouped_forward` (except under ``budget.mode = "recompute"``), which agrees with it to
    float tolerance (a test).
    """

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: nn.Module,
                 requires_grad: bool = True) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj.detach().clone(), requires_grad=requires_grad)
        self.down_proj = nn.Parameter(down_proj.detach().clone(), requires_grad=requires_grad)
        self.act_fn = act_fn
        self.lora = nn.ModuleDict()  # per-projection LoRA factors (hfedmoe.model.lora)

    def lora_targets(self) -> dict[str, nn.Parameter]:
        """The projections LoRA adapts, by name: weight (out, in)."""
        return {"gate_up_proj": self.gate_up_proj, "down_proj": self.down_proj}

    def fused_tensors(self) -> dict[str, torch.Tensor]:
        """This expert's slices in the fused layout, by the fused tensor's name."""
        return {"gate_up_proj": self.gate_up_proj.detach(), "down_proj": self.down_proj.detach()}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if len(self.lora):
            gate, up = lora_linear(hidden_states, self.gate_up_proj,
                                   self.lora["gate_up_proj"]).chunk(2, dim=-1)  # (t, I) x2
            return lora_linear(self.act_fn(gate) * up, self.down_proj, self.lora["down_proj"])
        gate, up = nn.functional.linear(hidden_states, self.gate_up_proj).chunk(2, dim=-1)  # (t, I) x2
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj)  # (t, H)

    @staticmethod
    def grouped_forward(experts: Sequence["GatedExpert"], x: torch.Tensor, sizes: Sequence[int]
                        ) -> torch.Tensor:
        """Each expert's forward on its block of rows of ``x`` (n, H), ``sizes[i]`` rows for
        ``experts[i]``, as two grouped matrix products (two more per projection with LoRA
        factors, hfedmoe.model.lora). (n, H)."""
        lora = len(experts[0].lora) > 0
        # the frozen weights as functions: read again in the backward, not kept (LoRA)
        gate_up = grouped_linear(x, lambda: [e.gate_up_proj for e in experts], sizes)  # (n, 2I)
        if lora:
            gate_up = gate_up + grouped_lora_delta(
                x, [e.lora["gate_up_proj"] for e in experts], sizes, grouped_linear)
        gate, up = gate_up.chunk(2, dim=-1)  # (n, I) x2
        hidden = experts[0].act_fn(gate) * up  # (n, I)
        out = grouped_linear(hidden, lambda: [e.down_proj for e in experts], sizes)  # (n, H)
        if lora:
            out = out + grouped_lora_delta(hidden, [e.lora["down_proj"] for e in experts],
                                           sizes, grouped_linear)
        return out


def check_fused_layout(experts: nn.Module, where: str) -> None:
    """Raise :class:`UnsupportedModelError` unless ``experts`` is a concatenated, untransposed,
    bias-free gated fused experts module with the default gate ``act(g) * u``."""
    from transformers.integrations.moe import _default_apply_gate

    flags = {name: getattr(experts, name, None) for name in _SUPPORTED_LAYOUT}
    if flags != _SUPPORTED_LAYOUT:
        raise UnsupportedModelError(f"{where}: fused experts layout {flags} is not supported; "
                                    f"only {_SUPPORTED_LAYOUT}")
    if getattr(type(experts), "_apply_gate", None) is not _default_apply_gate:
        raise UnsupportedModelError(f"{where}: custom expert gating is not supported")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0] \
            or gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
        raise UnsupportedModelError(f"{where}: expected gate_up_proj (S, 2I, H) and down_proj "
                                    f"(S, H, I); got {tuple(gate_up.shape)}, {tuple(down.shape)}")


def bank_from_fused(experts: nn.Module, layer_index: int) -> SparseExperts:
    """Per-expert copies of a fused experts module's slices, as a bank for MoE layer ``layer_index``."""
    gate_up, down = experts.gate_up_proj, experts.down_proj  # (S, 2I, H), (S, H, I)
    return SparseExperts(
        [GatedExpert(gate_up[e], down[e], experts.act_fn, gate_up.requires_grad)
         for e in range(gate_up.shape[0])],
        layer_index=layer_index,
    )


ROUTER_NAMES = ("gate", "router")  # the router child of a standard MoE block


def moe_blocks(backbone: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """The standard transformers 5 MoE blocks of ``backbone``, in layer order:
    ``(name, block, router)`` for each direct child of ``layers[i]`` (``mlp``,
    ``block_sparse_moe``, ``feed_forward``, ...) that holds a fused ``experts`` module (a
    ``gate_up_proj`` parameter) and a router child named ``gate`` or ``router``. Layers without
    one are dense. Recognised by structure, not by ``model_type``."""
    found = []
    for index, layer in enumerate(getattr(backbone, "layers", [])):
        for child_name, block in layer.named_children():
            experts = getattr(block, "experts", None)
            router = next((getattr(block, n) for n in ROUTER_NAMES
                           if isinstance(getattr(block, n, None), nn.Module)), None)
            if isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter) \
                    and router is not None:
                found.append((f"layers.{index}.{child_name}", block, router))
    return found


def convert_fused_experts(backbone: nn.Module) -> tuple[list[SparseExperts], list[nn.Module]]:
    """Replace the fused ``experts`` of every :func:`moe_blocks` block by a bank, in place;
    return (banks, routers) in MoE-layer order. UnsupportedModelError (one line) when the
    model has no such block, or when a block's experts have another layout
    (:func:`check_fused_layout`)."""
    banks: list[SparseExperts] = []
    routers: list[nn.Module] = []
    for name, block, router in moe_blocks(backbone):
        if is_gpt_oss_layout(block.experts):  # transposed, biased, interleaved (gpt_oss.py)
            bank = bank_from_gpt_oss(block.experts, layer_index=len(banks))
        else:
            check_fused_layout(block.experts, f"{name}.experts")
            bank = bank_from_fused(block.experts, layer_index=len(banks))
        block.experts = bank
        banks.append(bank)
        routers.append(router)
    if not banks:
        raise UnsupportedModelError(
            f"{type(backbone).__name__} has no MoE block of the standard transformers layout "
            "(a router 'gate' or 'router' beside fused experts 'gate_up_proj'/'down_proj' in "
            "a decoder layer)")
    return banks, routers


def softmax_routing(output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """G = softmax(router_logits): ((tokens, S) float32, top_k_index (tokens, k))."""
    router_logits, _, top_k_index = output
    return torch.softmax(router_logits.float(), dim=-1), top_k_index


def normalised_sigmoid_routing(output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: G_e = sigmoid(l_e) / Σ_j sigmoid(l_j) (see module docstring)."""
    router_logits, _, top_k_index = output
    scores = torch.sigmoid(router_logits.float())  # (tokens, S)
    return scores / scores.sum(dim=-1, keepdim=True), top_k_index


# families whose router scores experts with a sigmoid (DeepSeek-V3 style), read from their
# modeling code in transformers 5.23; cohere2_moe chooses by config.expert_selection_fn
SIGMOID_SCORED = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "minimax_m2", "lfm2_moe",
                  "afmoe")


def routing_function(family: str, config: PretrainedConfig | None = None) -> RoutingFn:
    """G_e(x) of ``family`` (module docstring): normalised sigmoid for the families that score
    with a sigmoid (:data:`SIGMOID_SCORED`, or ``config.expert_selection_fn = "sigmoid"``),
    else the softmax of the router logits."""
    sigmoid = family in SIGMOID_SCORED or \
        getattr(config, "expert_selection_fn", "softmax") == "sigmoid"
    return normalised_sigmoid_routing if sigmoid else softmax_routing


def top_k(config: PretrainedConfig) -> int:
    return int(config.num_experts_per_tok)


# A tiny config for a family recognised by structure: these attributes, where the family's
# config has them (2 layers, hidden 64, 8 experts of 32, top-2, MiniLM's vocabulary)
GENERIC_TINY = dict(vocab_size=30522, hidden_size=64, intermediate_size=64,
                    moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_experts=8, num_local_experts=8,
                    n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                    pad_token_id=0, bos_token_id=101, eos_token_id=102, use_cache=False)
# per family: what GENERIC_TINY does not fit (tested in tests/unit/test_more_families.py)
TINY_EXTRA: dict[str, dict] = {
    "deepseek_v2": dict(num_key_value_heads=4, n_group=2, topk_group=1, q_lora_rank=32,
                        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        first_k_dense_replace=0, head_dim=8),
    "glm4_moe": dict(first_k_dense_replace=1, num_hidden_layers=3, n_group=1, topk_group=1),
    "ernie4_5_moe": dict(moe_layer_start_index=0),
    "dots1": dict(n_shared_experts=1),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["conv", "full_attention"]),
    "glm4_moe_lite": dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                          qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16,
                          v_head_dim=16),
}


def generic_tiny_config(family: str) -> PretrainedConfig:
    """A ~2M-parameter random config of any transformers family (:data:`GENERIC_TINY`,
    :data:`TINY_EXTRA`); UnsupportedModelError when transformers does not know ``family``."""
    try:
        config = transformers.AutoConfig.for_model(family)
    except ValueError:
        raise UnsupportedModelError(f"transformers {transformers.__version__} has no "
                                    f"model_type '{family}'") from None
    for key, value in {**GENERIC_TINY, **TINY_EXTRA.get(family, {})}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    for key in [k for k in vars(config) if k.endswith("layer_types")]:  # one entry per layer
        if isinstance(getattr(config, key), list):  # the last ones: hybrid stacks end with
            setattr(config, key, getattr(config, key)[-config.num_hidden_layers:])  # attention
    return config


def tiny_config(family: str) -> PretrainedConfig:
    """A ~2M-parameter random config: hidden 64, 2 MoE layers of 8 experts, top-2, MiniLM's
    vocabulary (30522; pad 0, [CLS] 101, [SEP] 102). DeepSeek-V3 has one extra dense layer
    first (``first_k_dense_replace = 1``) so that dense-layer skipping is exercised."""
    common = dict(vocab_size=30522, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=101,
                  eos_token_id=102, num_experts_per_tok=2, use_cache=False)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, num_hidden_layers=2, intermediate_size=128,
                                           moe_intermediate_size=32, num_experts=8,
                                           shared_expert_intermediate_size=64)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, num_hidden_layers=2, intermediate_size=128,
                                           head_dim=16, moe_intermediate_size=32, num_experts=8)
    if family == "olmoe":
        return transformers.OlmoeConfig(**common, num_hidden_layers=2, intermediate_size=32,
                                        num_experts=8)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, num_hidden_layers=2, intermediate_size=32,
                                          num_local_experts=8)
    if family == "deepseek_v3":
        common["num_key_value_heads"] = 4
        return transformers.DeepseekV3Config(
            **common, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128,
            moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, n_group=2,
            topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16)
    raise UnsupportedModelError(f"no tiny config for family '{family}'; fused families are "
                                f"{', '.join(FUSED_FAMILIES)}")
