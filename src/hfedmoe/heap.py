"""Give freed heap memory back to the operating system between rounds (glibc's malloc_trim).

A round allocates and frees the same large tensors again and again (a client's optimizer
state, uploads, their serialised copies). glibc serves allocations of up to 32 MiB from its
heap once such a block has been freed (the dynamic mmap threshold), and memory freed in the
middle of a fragmented heap stays in the process: its resident size creeps up round after
round. Measured on SmolLM2-MoE 4x1 in-process (fedavg, 4 clients of 1.2 GiB uploads,
docs/language-models.md): without trimming the process passed 24 GiB in round 2 and was
killed; with ``malloc_trim(0)`` after each client round and each server step (which returns
the heap's free pages, :func:`return_freed_memory`, always on) it finished at 23.7 GiB; with a
fixed mmap threshold as well (``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment: every
block of 1 MiB or more mmapped and returned on free) at 20.8 GiB. That threshold is not set
here: it makes every large activation a fresh mapping (page faults on each allocation), a
cost not measured yet on small models.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, or None where the C library has no malloc_trim (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Release the heap's free pages to the OS; True when glibc did it (a no-op elsewhere)."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
