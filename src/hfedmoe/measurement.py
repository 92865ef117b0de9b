"""Measured training costs: allocator peaks, saved-activation bytes, gradient and
optimizer-state bytes.

Peak training memory, two ways:

* **measured** (:class:`AllocatorPeak`): on CUDA the allocator's peak
  (``torch.cuda.max_memory_allocated``, reset at the start of each client's training); on CPU,
  where torch keeps no allocator statistics (and a process's peak RSS mixes every client a Ray
  worker ever ran), the CPU allocator's own allocation and free events recorded by the PyTorch
  profiler (``profile_memory=True``): the bytes resident when the block starts (parameters,
  gradients, optimizer state, counted exactly) plus the largest running sum of the block's
  allocations minus frees, backward temporaries and optimizer updates included;
* **estimate** (the tensor accounting below, cheap enough for every step of every client):

    peak_memory_bytes = parameter bytes + max over steps of the gradient bytes
                        + max over steps of the optimizer-state bytes (after each step)
                        + max over steps of the bytes saved for backward

Saved-for-backward bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``,
deduplicated by storage and without the parameters' own storage (views of weights included),
so an inactive expert (no grad) contributes nothing and a deferred one only its input tokens.
It misses allocations made during the backward itself (gradient buffers before they are
accumulated, temporaries) and the optimizer's temporaries; `hfedmoe bench step` reports both.

A whole process's memory (:func:`process_memory`: resident now and the lifetime peak, as the
kernel counts them) is what a Ray actor or a SuperNode's ClientApp process costs the machine:
clients report it with every reply, so memory that creeps across rounds shows in the records.
"""

from __future__ import annotations

import os
import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper


@dataclass(frozen=True)
class ProcessMemory:
    resident_bytes: int  # resident set size now (bytes)
    peak_resident_bytes: int  # the process's largest resident set size so far (bytes)


def process_memory() -> ProcessMemory:
    """This process's resident memory now and its lifetime peak, in bytes: ``VmRSS`` and
    ``VmHWM`` of ``/proc/self/status`` (one read, so the two are consistent); where there is
    no /proc, ``getrusage``'s ``ru_maxrss`` (KiB on Linux, bytes on macOS) stands in for both.
    The kernel's counters are approximate to a few hundred KiB. A Ray actor's peak covers
    every client it ever ran."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0]) * 1024  # "<n> kB"
    except (OSError, ValueError, IndexError):
        fields = {}
    if len(fields) == 2:
        return ProcessMemory(fields["VmRSS"], max(fields["VmHWM"], fields["VmRSS"]))
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = usage if sys.platform == "darwin" else usage * 1024
    return ProcessMemory(peak, peak)


def process_cpu_seconds() -> float:
    """CPU time (user + system, every thread) this process has used so far, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


class AllocatorPeak:
    """Peak bytes held while the ``with`` block runs, as the allocator saw them.

    ``resident_bytes``: what exists when the block starts and stays (the caller counts it
    exactly: parameters, gradients, optimizer state). On CPU the block runs under the PyTorch
    profiler with memory events (slower: use it on measured steps, not timed ones); on CUDA the
    allocator's own peak of the block is read. ``peak_bytes`` holds the result after the block.
    """

    def __init__(self, device: torch.device | str = "cpu", resident_bytes: int = 0) -> None:
        self.device = torch.device(device)
        self.resident_bytes = resident_bytes
        self.peak_bytes = 0
        self._profile = None

    def __enter__(self) -> "AllocatorPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            os.environ.setdefault("KINETO_LOG_LEVEL", "10")  # no stage lines per profile
            self._profile = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            growth = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._profile.__exit__(*exc_info)
            growth = _largest_running_sum(self._profile)
            self._profile = None
        self.peak_bytes = self.resident_bytes + max(0, growth)


def _largest_running_sum(profile: "torch.profiler.profile") -> int:
    """The largest running sum of the CPU allocator's events (bytes: + allocated, - freed) in
    time order; frees of blocks allocated before the profile make the sum dip below zero,
    which the maximum ignores."""
    events = [(e.start_ns(), e.nbytes()) for e in profile.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


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
