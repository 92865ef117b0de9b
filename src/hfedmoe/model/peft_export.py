"""A LoRA run's adapter in peft's format (``<out>/final-model/adapter``), loadable with stock
``peft.PeftModel.from_pretrained(base, folder)`` on the run's base model
(``<out>/final-model/base``, a stock transformers folder of the same family).

peft 0.21 adapts the fused expert tensors of transformers 5's MoE blocks with
``LoraConfig(target_parameters=...)`` (its ``ParamWrapper``): for a parameter of shape
(S, out, in) it keeps ``lora_A`` (S·r, in) and ``lora_B`` (out, S·r) and computes expert e's
update as ``scaling · B_e A_e`` with

    A_e = lora_A[e·r : (e+1)·r, :]        (r, in)
    B_e = lora_B[:, [j·S + e for j in range(r)]]   (out, r)

(``get_delta_weight``: A reshaped (S, r, in), B reshaped (out, r, S)). hfedmoe's per-expert
factors (hfedmoe.model.lora: A (r, in), B (out, r), scaling alpha / r) map onto that exactly,
so the export is a re-layout, not an approximation; a test compares the loaded peft model's
logits with hfedmoe's own and with the merged model's.

peft is used here and not in training: its fused-expert LoRA computes every expert's update
on every forward and refuses dropout, so it cannot give a budget any saving (docs/lora.md).
The adapter's ``lora_dropout`` is 0 for the same reason (dropout acts only in training).

Attention projections with factors (``lora.targets = "experts+attention"``; an ``nn.Linear``
whose forward hook adds ``scaling · B A x``, hfedmoe.model.lora) are peft's plain
``target_modules``: its ``lora_A`` (r, in) and ``lora_B`` (out, r) are our A and B as they are.

What else trained travels whole, as peft's ``modules_to_save``: the routers, and the
non-expert modules of ``model.trainable-non-expert`` (the head; with ``"all"`` the attention,
norms and shared experts too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from hfedmoe.model.lora import LINEAR_FACTORS, LoRAFactors, LoRASettings
from hfedmoe.model.sparse_experts import SparseExperts

ADAPTER_NAME = "default"  # peft's name of a model's first adapter


def peft_factors(factors: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``(lora_A (S·r, in), lora_B (out, S·r))`` of one fused parameter from the S
    experts' :class:`~hfedmoe.model.lora.LoRAFactors` (A (r, in), B (out, r)), in expert
    order (module docstring)."""
    lora_a = torch.cat([f.A.detach() for f in factors])  # (S·r, in), expert-major
    lora_b = torch.stack([f.B.detach() for f in factors], dim=-1)  # (out, r, S)
    return lora_a, lora_b.reshape(lora_b.shape[0], -1)  # column j·S + e = B_e[:, j]


def adapted_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` that carry LoRA factors (attention projections
    under ``lora.targets = "experts+attention"``), by name, in module order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(getattr(m, LINEAR_FACTORS, None), LoRAFactors)}


def trained_module_names(model: nn.Module, trained: Iterable[nn.Parameter],
                         adapted: Sequence[nn.Module]) -> list[str]:
    """Names in ``model`` of the modules owning the ``trained`` parameters that are not inside
    ``adapted`` (expert banks, projections with factors): routers, head, ...; one per module,
    sorted. Raises ValueError when such a module also holds a frozen parameter (peft's
    ``modules_to_save`` saves modules whole)."""
    adapted_ids = {id(p) for module in adapted for p in module.parameters()}
    trained_ids = {id(p) for p in trained} - adapted_ids
    owners: set[str] = set()
    for name, param in model.named_parameters():
        if id(param) in trained_ids:
            owners.add(name.rpartition(".")[0])
    for owner in owners:
        frozen = [n for n, p in model.get_submodule(owner).named_parameters()
                  if id(p) not in trained_ids]
        if frozen:
            raise ValueError(f"module '{owner}' has trained and frozen parameters ({frozen[0]}); "
                             f"peft saves a module whole")
    return sorted(owners)


def export_peft_adapter(causal_lm: nn.Module, banks: Sequence[SparseExperts],
                        trained: Iterable[nn.Parameter], settings: LoRASettings,
                        base_folder: Path, folder: Path) -> Path:
    """Write the LoRA factors of ``banks`` and of the adapted attention projections
    (:func:`adapted_linears`), and the ``trained`` non-expert modules of
    ``causal_lm`` (a transformers ``*ForCausalLM`` whose fused experts were converted to
    ``banks``, factors attached) as a peft adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) for the stock model in ``base_folder``; returns ``folder``.
    Raises ValueError when a bank's experts have no factors."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoModelForCausalLM

    names = {id(module): name for name, module in causal_lm.named_modules()}
    bank_names = [names[id(bank)] for bank in banks]
    projections = list(banks[0].experts[0].lora.keys())
    if not projections:
        raise ValueError("the experts have no LoRA factors: nothing to export as an adapter")
    linears = adapted_linears(causal_lm)
    to_save = trained_module_names(causal_lm, trained, [*banks, *linears.values()])
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
        target_modules=list(linears),
        target_parameters=[f"{bank}.{p}" for bank in bank_names for p in projections],
        modules_to_save=to_save or None, init_lora_weights=False,
        base_model_name_or_path=str(Path(base_folder).resolve()))
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for bank, bank_name in zip(banks, bank_names):
            wrappers = _param_wrappers(inner.get_submodule(bank_name), ParamWrapper)
            for projection in projections:
                lora_a, lora_b = peft_factors([e.lora[projection] for e in bank.experts])
                wrapper = wrappers[projection]
                wrapper.lora_A[ADAPTER_NAME].weight.copy_(lora_a)
                wrapper.lora_B[ADAPTER_NAME].weight.copy_(lora_b)
        for name, linear in linears.items():
            layer = inner.get_submodule(name)  # peft's lora.Linear around the projection
            factors = getattr(linear, LINEAR_FACTORS)
            layer.lora_A[ADAPTER_NAME].weight.copy_(factors.A.detach().to("cpu", torch.float32))
            layer.lora_B[ADAPTER_NAME].weight.copy_(factors.B.detach().to("cpu", torch.float32))
        for name in to_save:
            saved = inner.get_submodule(name).modules_to_save[ADAPTER_NAME]
            saved.load_state_dict(_cpu_state(causal_lm.get_submodule(name)), strict=True)
    peft_model.save_pretrained(folder)
    return folder


def _param_wrappers(module: nn.Module, wrapper_type: type) -> Mapping[str, nn.Module]:
    """peft's nested ParamWrappers around one fused experts module, by parameter name."""
    found = {}
    while isinstance(module, wrapper_type):
        found[module.parameter_name] = module
        module = module.base_layer
    return found


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32) for k, v in module.state_dict().items()}
