"""The one concrete :class:`~hfedmoe.model.adapter.MoEAdapter`, for every family, by composition.

A family module (``hf_moe``, ``switch``, ``minilm``) converts a model so that each MoE layer's
routed experts live in a :class:`SparseExperts` bank, and hands this class the banks, the
router modules and a *routing function* that reads a router's forward output. Nothing here
knows a family's module names: parameter names are found by identity.

Partition invariant: every parameter of ``model`` is exactly one of a routed-expert
parameter, a router parameter, an input-embedding parameter, or a non-expert parameter
(``non_expert_parameters("all")``), but for the frozen A factors of attention projections under
``lora.aggregation = "frozen-a"`` (seeded, the same in every process, never exchanged).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from hfedmoe.model.adapter import BackwardPlan, MoEGeometry, OnlinePlan, RoutingTrace
from hfedmoe.model.classifier import HEAD_PREFIX, MoEClassifier
from hfedmoe.model.lora import (
    LINEAR_FACTORS,
    LORA_PREFIX,
    LoRAFactors,
    LoRASettings,
    attach_factors,
    attach_linear_factors,
    attention_projections,
    is_trainable_factor,
    merge_factors,
    merge_linear_factors,
)
from hfedmoe.model.quantize import dequantize_weights, quantize_weights
from hfedmoe.model.sparse_experts import SparseExperts

# router forward output -> (probabilities (tokens, S) float32, top_k_index (tokens, k) int64)
RoutingFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]

SCOPES = ("head", "all")


class UnsupportedModelError(ValueError):
    """The model's family or expert layout is not supported; the message is one line."""


class ModelAdapter:
    """Addresses the experts, routers and other parameters of one converted MoE classifier.

    ``banks[l]`` and ``routers[l]`` belong to MoE layer ``l`` (dense layers not counted);
    ``banks[l].layer_index`` must be ``l`` (it indexes ``BackwardPlan.active``).
    """

    def __init__(
        self,
        family: str,
        model: MoEClassifier,
        banks: Sequence[SparseExperts],
        routers: Sequence[nn.Module],
        routing: RoutingFn,
        top_k: int,
        input_embedding_names: Iterable[str],
    ) -> None:
        _check_layers(model, banks, routers, top_k)
        self.family = family
        self.model = model
        self.banks = tuple(banks)
        self.routers = tuple(routers)
        self.geometry = MoEGeometry(len(banks), banks[0].num_experts, top_k)
        self._routing = routing
        self._non_expert = _non_expert_names(model, banks, routers, set(input_embedding_names))
        self._lora: LoRASettings | None = None  # the experts' LoRA factors (attach_lora)
        # attention projections with factors (attach_lora(attention=True)): name -> (module,
        # the forward hook that adds the factors' update)
        self._adapted: dict[str, tuple[nn.Linear, Any]] = {}

    # --- live parameters -------------------------------------------------------------

    def expert_parameters(self, layer: int, expert: int) -> dict[str, nn.Parameter]:
        """The live trainable parameters of routed expert ``(layer, expert)`` by short name:
        its LoRA factors (``lora.<projection>.A`` / ``.B``; only the B factors with
        ``lora.aggregation = "frozen-a"``) when it has some (:meth:`attach_lora`), else its
        own weights."""
        self._check_expert(layer, expert)
        params = dict(self.banks[layer].experts[expert].named_parameters())
        if self._lora is None:
            return params
        return {name: p for name, p in params.items() if is_trainable_factor(name, self._lora)}

    def expert_weights(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Routed expert ``(layer, expert)``'s own weights by short name, trainable or frozen
        (with LoRA factors attached they are frozen; the factors are not among them). A
        quantized weight (hfedmoe.model.quantize) is given dequantized, under its own name."""
        self._check_expert(layer, expert)
        module = self.banks[layer].experts[expert]
        weights = {}
        for name, p in module.named_parameters():
            parts = name.split(".")
            if name.startswith(LORA_PREFIX):
                continue
            if "parametrizations" in parts:  # "[<owner>.]parametrizations.<weight>.original<i>"
                at = parts.index("parametrizations")
                if parts[at + 2] == "original0":  # the codes; original1... are its scales
                    owner = module.get_submodule(".".join(parts[:at]))
                    weights[".".join(parts[:at] + [parts[at + 1]])] = getattr(owner, parts[at + 1])
                continue
            weights[name] = p
        return weights

    def attach_lora(self, settings: LoRASettings, seed: int, attention: bool = False) -> None:
        """Give every routed expert its own LoRA factors (hfedmoe.model.lora), seeded by
        (``seed``, layer, expert, projection); from then on they are the experts' trainable
        parameters and the base weights stay frozen. ``attention``: every attention projection
        (``lora.targets = "experts+attention"``) gets factors too, seeded by (``seed``, its
        name); they are non-expert parameters (:meth:`non_expert_parameters`, any scope).
        Raises :class:`UnsupportedModelError` for a family whose experts have no LoRA targets,
        or (``attention``) whose attention has no ``nn.Linear`` projections."""
        for bank in self.banks:
            for index, expert in enumerate(bank.experts):
                if not hasattr(expert, "lora_targets"):
                    raise UnsupportedModelError(
                        f"train.adapter = \"lora\" is not supported for {self.family} experts "
                        f"({type(expert).__name__}); use train.adapter = \"none\"")
                attach_factors(expert, settings, seed, bank.layer_index, index)
        if attention:
            projections = attention_projections(self.model, [*self.banks, *self.routers])
            if not projections:
                raise UnsupportedModelError(
                    f"lora.targets = \"experts+attention\": no attention projections (nn.Linear "
                    f"inside an *Attention module) found in {self.family}; use \"experts\"")
            for name, linear in projections.items():
                self._adapted[name] = (linear, attach_linear_factors(linear, name, settings, seed))
        self._lora = settings

    def attention_factors(self) -> dict[str, LoRAFactors]:
        """The attention projections' LoRA factors by the projection's name in ``model``
        (empty unless ``attach_lora(..., attention=True)``)."""
        return {name: getattr(linear, LINEAR_FACTORS) for name, (linear, _) in self._adapted.items()}

    def quantize_experts(self, scheme: str) -> None:
        """Hold every routed expert's LoRA target weights (its projections) quantized with
        ``scheme`` ("nf4", "int8"; "none" does nothing), frozen (hfedmoe.model.quantize)."""
        for bank in self.banks:
            for expert in bank.experts:
                if not hasattr(expert, "lora_targets"):
                    raise UnsupportedModelError(
                        f"model.quantization is not supported for {self.family} experts")
                quantize_weights(list(expert.lora_targets().values()), expert, scheme)

    def merge_lora(self) -> None:
        """Fold every expert's LoRA factors into its weights (W ← W + ΔW) and drop them: the
        model is then a plain model with the same outputs (dropout off), for export. Quantized
        weights are dequantized first (W is then the dequantized base)."""
        for bank in self.banks:
            dequantize_weights(bank)
        for bank in self.banks:
            for expert in bank.experts:
                if len(getattr(expert, "lora", ())):
                    merge_factors(expert)
        for linear, hook in self._adapted.values():
            merge_linear_factors(linear, hook)
        self._adapted = {}
        self._lora = None

    def router_parameters(self, layer: int) -> dict[str, nn.Parameter]:
        """The live parameters of MoE layer ``layer``'s router by short name (no buffers)."""
        self._check_layer(layer)
        return dict(self.routers[layer].named_parameters())

    def non_expert_parameters(self, scope: str) -> dict[str, nn.Parameter]:
        """``"head"``: the head (``classifier.*``, or ``lm_head.*`` of a causal LM when its
        head is not tied to the input embedding); ``"all"``: every parameter that is not a routed
        expert, a router or an input embedding. Both scopes add the attention projections'
        LoRA factors when there are some (``<projection>.lora.A`` / ``.B``; only the B factors
        with ``lora.aggregation = "frozen-a"``). Returned regardless of ``requires_grad``;
        names are the model's own (``backbone.…`` / ``classifier.…``)."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
        named = dict(self.model.named_parameters())
        head = getattr(self.model, "head_prefix", HEAD_PREFIX)
        keep = [n for n in self._non_expert if scope == "all" or n.startswith(head)]
        params = {name: named[name] for name in keep}
        for name, factors in self.attention_factors().items():
            for short, p in factors.named_parameters():
                if is_trainable_factor(f"{LORA_PREFIX}{short}", self._lora):
                    params[f"{name}.{LINEAR_FACTORS}.{short}"] = p
        return params

    # --- context managers ------------------------------------------------------------

    @contextmanager
    def trace_routing(self) -> Iterator[RoutingTrace]:
        """Record every router call inside the block, in call order (= layer order for one
        forward pass; a second pass appends L more entries). Hooks are removed on exit."""
        trace = RoutingTrace()

        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            probabilities, top_k_index = self._routing(output)
            trace.probabilities.append(probabilities)  # (tokens, S) float32, attached
            trace.top_k_index.append(top_k_index)  # (tokens, k) int64

        handles = [router.register_forward_hook(record) for router in self.routers]
        try:
            yield trace
        finally:
            for handle in handles:
                handle.remove()

    def deferred_expert_backward(self) -> AbstractContextManager[BackwardPlan]:
        """Attach one fresh :class:`BackwardPlan` to every bank for the forward passes run
        inside the block; set ``plan.active`` before ``backward()``, which may run after
        the block exits (the graph keeps the plan). Banks are detached on exit."""
        return self._attached(BackwardPlan())

    def budgeted_experts(self, choose: Callable[[int], torch.Tensor]
                         ) -> AbstractContextManager[OnlinePlan]:
        """Attach one fresh :class:`OnlinePlan` to every bank for the forward passes run
        inside the block (each bank asks ``choose(layer)`` after its router); detached on
        exit. The graph needs nothing of the plan at backward time."""
        return self._attached(OnlinePlan(choose))

    @contextmanager
    def _attached(self, plan: BackwardPlan | OnlinePlan) -> Iterator[BackwardPlan | OnlinePlan]:
        if any(bank.plan is not None for bank in self.banks):
            raise RuntimeError("an expert plan is already attached to this model")
        for bank in self.banks:
            bank.plan = plan
        try:
            yield plan
        finally:
            for bank in self.banks:
                bank.plan = None

    # --- detached copies in / out ----------------------------------------------------

    def expert_state(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Detached clones of expert ``(layer, expert)``'s tensors."""
        return _detached(self.expert_parameters(layer, expert))

    def load_expert_state(self, layer: int, expert: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (exactly the expert's names, same shapes and dtypes) into it."""
        _load(self.expert_parameters(layer, expert), tensors, f"expert ({layer}, {expert})", exact=True)

    def router_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Detached clones of MoE layer ``layer``'s router tensors."""
        return _detached(self.router_parameters(layer))

    def load_router_state(self, layer: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (exactly the router's names, same shapes and dtypes) into it."""
        _load(self.router_parameters(layer), tensors, f"router of layer {layer}", exact=True)

    def non_expert_state(self, scope: str) -> dict[str, torch.Tensor]:
        """Detached clones of ``non_expert_parameters(scope)``."""
        return _detached(self.non_expert_parameters(scope))

    def load_non_expert_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (any subset of the ``"all"`` scope's names) into the model."""
        _load(self.non_expert_parameters("all"), tensors, "non-expert state", exact=False)

    # --- argument checks -------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.geometry.num_layers:
            raise IndexError(f"MoE layer {layer} out of range 0..{self.geometry.num_layers - 1}")

    def _check_expert(self, layer: int, expert: int) -> None:
        self._check_layer(layer)
        if not 0 <= expert < self.geometry.num_experts:
            raise IndexError(f"expert {expert} out of range 0..{self.geometry.num_experts - 1}")


def _check_layers(model: nn.Module, banks: Sequence[SparseExperts], routers: Sequence[nn.Module],
                  top_k: int) -> None:
    if not banks or len(banks) != len(routers):
        raise ValueError(f"need one router per expert bank and at least one bank; got "
                         f"{len(banks)} banks and {len(routers)} routers")
    sizes = {bank.num_experts for bank in banks}
    if len(sizes) != 1:
        raise UnsupportedModelError(f"MoE layers have different expert counts {sorted(sizes)}")
    if not 1 <= top_k <= banks[0].num_experts:
        raise ValueError(f"top_k must be in 1..{banks[0].num_experts}, got {top_k}")
    for layer, bank in enumerate(banks):
        if bank.layer_index != layer:
            raise ValueError(f"bank {layer} has layer_index {bank.layer_index}; expected {layer}")
    members = {id(m) for m in model.modules()}
    if any(id(m) not in members for m in [*banks, *routers]):
        raise ValueError("every expert bank and router must be a submodule of the model")


def _non_expert_names(model: nn.Module, banks: Sequence[nn.Module], routers: Sequence[nn.Module],
                      embedding_names: set[str]) -> tuple[str, ...]:
    named = dict(model.named_parameters())
    unknown = embedding_names - named.keys()
    if unknown:
        raise ValueError(f"input-embedding parameters not in the model: {sorted(unknown)}")
    excluded = {id(p) for m in [*banks, *routers] for p in m.parameters()}
    excluded |= {id(named[n]) for n in embedding_names}
    return tuple(name for name, p in named.items() if id(p) not in excluded)


def _detached(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def _load(params: Mapping[str, nn.Parameter], tensors: Mapping[str, torch.Tensor], what: str,
          exact: bool) -> None:
    unknown = sorted(set(tensors) - params.keys())
    missing = sorted(params.keys() - set(tensors)) if exact else []
    if unknown or missing:
        raise ValueError(f"{what}: unknown names {unknown}, missing names {missing}")
    for name, value in tensors.items():
        target = params[name]
        if value.shape != target.shape or value.dtype != target.dtype:
            raise ValueError(
                f"{what} '{name}': got {tuple(value.shape)} {value.dtype}, "
                f"expected {tuple(target.shape)} {target.dtype}"
            )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
