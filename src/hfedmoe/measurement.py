"""Measured training costs: saved-activation bytes, gradient and optimizer-state bytes.

On CPU, torch keeps no allocator statistics, and a process's peak RSS mixes every client a
Ray worker ever ran. We therefore measure training memory from the tensors themselves:

    peak_memory_bytes = parameter bytes + max over steps of the gradient bytes
                        + max over steps of the optimizer-state bytes (after each step)
                        + max over steps of the bytes saved for backward

Saved-for-backward bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``,
deduplicated by storage and without the parameters' own storage (views of weights included),
so an inactive expert (no grad) contributes nothing and a deferred one only its input tokens.
This is an ESTIMATE: allocations made during the backward itself (gradient buffers before they
are accumulated, temporaries) are not counted. On CUDA, the allocator's peak
(``torch.cuda.max_memory_allocated``, reset at the start of each client's training) is
reported instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper


class SavedActivationMeter:
    """Counts the bytes autograd saves for backward inside ``measure()`` blocks.

    Tensors that share storage with one of ``weights`` (the model's parameters) are not
    activations and are not counted: ``F.linear`` saves its weight as a transposed VIEW of
    the parameter, which an ``isinstance(t, Parameter)`` test misses (it counted 36 MiB of
    MiniLM-MoE's weights as activations of plain training)."""

    def __init__(self, weights: Iterable[torch.Tensor] = ()) -> None:
        self.peak_bytes = 0
        self._weights = {w.untyped_storage().data_ptr() for w in weights}

    @contextmanager
    def measure(self) -> Iterator[None]:
        seen: set[int] = set(self._weights)
        total = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total[0] += storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.peak_bytes = max(self.peak_bytes, total[0])


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        tensor_bytes(v for v in state.values() if isinstance(v, torch.Tensor))
        for state in optimizer.state.values()
    )


def gradient_bytes(params: Iterable[torch.nn.Parameter]) -> int:
    return tensor_bytes(p.grad for p in params)


def grouped_mm_flops(a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args: object,
                     out_shape: tuple[int, ...] | None = None, **kwargs: object) -> int:
    """FLOPs (2 per multiply-add) of ``aten._grouped_mm``, which torch's FlopCounterMode does
    not count: jagged groups cover each row (2D operand) once, so the total is that of one
    dense product over all rows. Cases by operand ranks: (n, K) x (g, K, N) -> 2nKN;
    (K, n) x (n, N) (weight gradients) -> 2KnN; (g, M, K) x (K, n) -> 2MKn;
    (g, M, K) x (g, K, N) -> 2gMKN."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


class FlopCount(TorchDispatchMode):
    """Exact FLOPs (2 per multiply-add) of the matmul-like ops run inside the block, by
    torch's own formulas (``torch.utils.flop_counter``) plus :func:`grouped_mm_flops`;
    elementwise ops are not counted. Unlike ``FlopCounterMode`` it tracks no module
    hierarchy, so it also counts a backward that calls ``torch.autograd.grad`` (the
    ``budget.mode = "recompute"`` experts). ``total`` holds the count."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self._formulas = {**flop_registry,
                          torch.ops.aten._grouped_mm: shape_wrapper(grouped_mm_flops)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def flop_counter() -> FlopCount:
    """A fresh :class:`FlopCount` (use as a context manager, read ``.total``)."""
    return FlopCount()
