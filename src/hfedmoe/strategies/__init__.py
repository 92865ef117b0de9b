"""Federated methods. The choice of method is made here, in one explicit mapping.

Ablations of HFedMoE are configurations of :class:`HFedMoEMethod` (one switch each):
``hfedmoe-no-ib`` (beta = 0: rank by importance alone), ``hfedmoe-fedavg-agg`` (HFedMoE's
selection, but every trainable tensor uploaded and averaged by |D_c|: no sparsity-aware
aggregation), ``hfedmoe-uniform-gate`` (the gate averaged by |D_c| instead of Eqs. 19-21).
``hfedmoe-data-share`` is not an ablation but our variant: HFedMoE with
``hfedmoe.expert-step = "data-share"`` (docs/hfedmoe.md), named so that ``compare`` can put it in
the same table.
"""

from __future__ import annotations

from dataclasses import replace

from hfedmoe.config import RunConfig
from hfedmoe.strategies.base import ClientPlan, Diagnostics, Method, PlanningMethod, plan_round
from hfedmoe.strategies.fedavg import FedAvgMethod
from hfedmoe.strategies.fedmoe import FedMoEMethod
from hfedmoe.strategies.flex import FLExMethod
from hfedmoe.strategies.hfedmoe import HFedMoEMethod
from hfedmoe.strategies.random_subset import RandomSubsetMethod
from hfedmoe.strategies.robust import robust_method


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
    return robust_method(methods[config.method], config.robust)  # robust.aggregation


__all__ = ["ClientPlan", "Diagnostics", "Method", "PlanningMethod", "method_for", "plan_round"]
