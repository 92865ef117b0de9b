"""Federated methods. The choice of method is made here, in one explicit mapping."""

from __future__ import annotations

from hfedmoe.config import RunConfig
from hfedmoe.strategies.base import Diagnostics, Method
from hfedmoe.strategies.fedavg import FedAvgMethod
from hfedmoe.strategies.hfedmoe import HFedMoEMethod


def method_for(config: RunConfig) -> Method:
    """The method named by the config key ``method`` (validated by hfedmoe.config)."""
    h = config.hfedmoe
    methods: dict[str, Method] = {
        "fedavg": FedAvgMethod(),
        "hfedmoe": HFedMoEMethod(h.lambda_, h.beta, h.tau, config.budget.per_layer or None),
    }
    return methods[config.method]


__all__ = ["Diagnostics", "Method", "method_for"]
