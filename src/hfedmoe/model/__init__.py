"""The model layer: the only code that knows module and parameter names of a model family.

Everything else sees a model through :class:`MoEAdapter` (implemented once, for every
family, by :class:`ModelAdapter`) and builds one with :func:`load_adapter`.
"""

from hfedmoe.model.adapter import BackwardPlan, MoEAdapter, MoEGeometry, OnlinePlan, RoutingTrace
from hfedmoe.model.generic import ModelAdapter, UnsupportedModelError
from hfedmoe.model.loading import (
    SUPPORTED_FAMILIES,
    ModelNotFoundError,
    load_adapter,
    load_tokenizer,
)

__all__ = [
    "SUPPORTED_FAMILIES",
    "BackwardPlan",
    "ModelAdapter",
    "ModelNotFoundError",
    "MoEAdapter",
    "MoEGeometry",
    "OnlinePlan",
    "RoutingTrace",
    "UnsupportedModelError",
    "load_adapter",
    "load_tokenizer",
]
