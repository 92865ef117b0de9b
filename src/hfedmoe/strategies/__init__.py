"""Federated methods. The server-side choice of method is made here, in one explicit mapping."""

from __future__ import annotations

from hfedmoe.strategies.base import ClientPlan, Method
from hfedmoe.strategies.fedavg import FedAvgMethod


def method_for(name: str) -> Method:
    """The method named by the config key ``method`` (validated by hfedmoe.config)."""
    methods: dict[str, Method] = {"fedavg": FedAvgMethod()}
    return methods[name]


__all__ = ["ClientPlan", "Method", "method_for"]
