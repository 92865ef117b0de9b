"""Measured training costs: saved-activation bytes, gradient and optimizer-state bytes.

On CPU, torch keeps no allocator statistics, and a process's peak RSS mixes every client a
Ray worker ever ran. We therefore measure training memory from the tensors themselves:

    peak_memory_bytes = parameter bytes + gradient bytes + optimizer-state bytes
                        + max over steps of the bytes saved for backward

Saved-for-backward bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``,
deduplicated by storage, so an expert whose backward is deferred and never runs (HFedMoE's
inactive experts) contributes only its input tokens. On CUDA, ``torch.cuda.max_memory_allocated``
is reported instead (it covers the same quantities plus allocator overhead).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


class SavedActivationMeter:
    """Counts the bytes autograd saves for backward inside ``measure()`` blocks."""

    def __init__(self) -> None:
        self.peak_bytes = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        seen: set[int] = set()
        total = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen and not isinstance(tensor, torch.nn.Parameter):
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
