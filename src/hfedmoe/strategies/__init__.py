"""Federated methods. The choice of method is made here, in one explicit mapping.

Ablations of HFedMoE are configurations of :class:`HFedMoEMethod` (one switch each):
``hfedmoe-no-ib`` (beta = 0: rank by importance alone), ``hfedmoe-fedavg-agg`` (HFedMoE's
selection, but every trainable tensor uploaded and averaged by |D_c|: no sparsity-aware
aggregation), ``hfedmoe-uniform-gate`` (the gate averaged by |D_c| instead of Eqs. 19-21).
``hfedmoe-data-share`` is not an ablation but our variant: HFedMoE with
``hfedmoe.expert-step = "data-share"`` (docs/hfedmoe.md), named so that ``compare`` can put it in
the same table.

``fedalign`` and ``hfedmoe-align`` (:mod:`hfedmoe.strategies.fedalign`) come with one ablation
per FedAlign-MoE mechanism: ``-no-gate`` (a), ``-no-reg`` (b), ``-no-consistency`` (c).
"""

from __future__ import annotations

from dataclasses import replace

from hfedmoe.config import RunConfig
from hfedmoe.strategies.base import (
    ClientPlan,
    StreamingMethod,
    begin_aggregation,
    Diagnostics,
    GuidedMethod,
    Guidance,
    Method,
    PlanningMethod,
    RoutingLoss,
    plan_round,
)
from hfedmoe.strategies.fedalign import FedAlignMethod
from hfedmoe.strategies.fedavg import FedAvgMethod
from hfedmoe.strategies.fedmoe import FedMoEMethod
from hfedmoe.strategies.flex import FLExMethod
from hfedmoe.strategies.hfedmoe import HFedMoEMethod
from hfedmoe.strategies.random_subset import RandomSubsetMethod
from hfedmoe.strategies.robust import robust_method, unwrapped


def method_for(config: RunConfig) -> Method:
    """The method named by the config key ``method`` (validated by hfedmoe.config)."""
    h = config.hfedmoe
    hfedmoe = HFedMoEMethod(h.lambda_, h.beta, h.tau, config.budget.per_layer or None,
                            expert_step=h.expert_step)
    methods: dict[str, Method] = {
        "hfedmoe": hfedmoe,
        "fedavg": FedAvgMethod(),
        "fedavg-full": FedAvgMethod(name="fedavg-full"),
        "fedavg-drop": FedAvgMethod(name="fedavg-drop", drop_constrained=True),
        "random-subset": RandomSubsetMethod(),
        "fedmoe": FedMoEMethod(config.budget.per_layer or None),
        "flex": FLExMethod(),
        "hfedmoe-no-ib": replace(hfedmoe, name="hfedmoe-no-ib", beta=0.0),
        "hfedmoe-fedavg-agg": replace(hfedmoe, name="hfedmoe-fedavg-agg", sparse_upload=False,
                                      expert_aggregation="fedavg"),
        "hfedmoe-uniform-gate": replace(hfedmoe, name="hfedmoe-uniform-gate",
                                        gate_weighting="examples"),
        "hfedmoe-data-share": replace(hfedmoe, name="hfedmoe-data-share",
                                      expert_step="data-share"),
    }
    a = config.fedalign
    fedalign = FedAlignMethod(divergence=a.divergence, routing_weight=a.routing_weight,
                              consistency_beta=a.consistency_beta,
                              consistency_floor=a.consistency_floor)
    for name, base in (("fedalign", fedalign),
                       ("hfedmoe-align", replace(fedalign, name="hfedmoe-align",
                                                 budgeted=hfedmoe))):
        methods[name] = base
        methods[f"{name}-no-gate"] = replace(base, name=f"{name}-no-gate", gate=False)
        methods[f"{name}-no-reg"] = replace(base, name=f"{name}-no-reg", routing_weight=0.0)
        methods[f"{name}-no-consistency"] = replace(base, name=f"{name}-no-consistency",
                                                    consistency=False)
    return robust_method(methods[config.method], config.robust)  # robust.aggregation


def server_guidance(method: Method, updates) -> Guidance:
    """What ``method``'s server sends every client with the next round ({} for most)."""
    inner = unwrapped(method)
    return inner.guidance(updates) if isinstance(inner, GuidedMethod) else {}


def client_routing_loss(method: Method, guidance, geometry) -> RoutingLoss | None:
    """The extra loss term of ``method``'s clients under ``guidance`` (None for most)."""
    inner = unwrapped(method)
    return inner.routing_loss(guidance, geometry) if isinstance(inner, GuidedMethod) else None


__all__ = ["ClientPlan", "Diagnostics", "StreamingMethod", "begin_aggregation", "Guidance", "GuidedMethod", "Method", "PlanningMethod",
           "RoutingLoss", "client_routing_loss", "method_for", "plan_round", "server_guidance"]
