"""The meters against tensors whose sizes are known, and FLOP counts against hand counts."""

import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hfedmoe.measurement import (
    AllocatorPeak,
    SavedActivationMeter,
    flop_counter,
    process_memory,
)


def test_saved_activations_count_inputs_and_outputs_but_not_weights_or_their_views():
    weight = torch.nn.Parameter(torch.randn(32, 64))  # F.linear saves weight.t(), a view
    x = torch.randn(100, 64, requires_grad=True)
    meter = SavedActivationMeter([weight])
    with meter.measure():
        hidden = F.linear(x, weight)  # saves x (for the weight's gradient) and the weight view
        out = torch.relu(hidden)  # saves its output (100, 32)
    assert meter.peak_bytes == 100 * 64 * 4 + 100 * 32 * 4
    unaware = SavedActivationMeter()  # without the weights: the view counts as an activation
    with unaware.measure():
        torch.relu(F.linear(x, weight))
    assert unaware.peak_bytes == meter.peak_bytes + 32 * 64 * 4
    out.sum().backward()


def test_flop_count_of_matmuls_and_grouped_matmuls_forward_and_backward():
    x = torch.randn(15, 32, requires_grad=True)
    weights = torch.randn(4, 64, 32, requires_grad=True)
    offsets = torch.tensor([5, 5, 12, 15], dtype=torch.int32)  # one empty group
    with flop_counter() as forward:
        y = F.grouped_mm(x, weights.transpose(-2, -1), offs=offsets)  # (15, 64)
        z = y @ torch.randn(64, 10)
    assert forward.total == 2 * 15 * 32 * 64 + 2 * 15 * 64 * 10
    with flop_counter() as backward:
        z.backward(torch.randn(15, 10))
    # z: grad of y only (the right factor needs none); y: grads of x and of the weights
    assert backward.total == 2 * 15 * 10 * 64 + 2 * (2 * 15 * 32 * 64)


MIB = 2**20


def test_allocator_peak_follows_allocations_and_frees_in_order():
    before = torch.empty(MIB // 4)  # allocated before: its free only lowers the running sum
    with AllocatorPeak("cpu", resident_bytes=7) as meter:
        a = torch.empty(MIB // 4)  # 1 MiB
        b = torch.empty(MIB // 2)  # 2 MiB: 3 MiB held
        del a, before  # 1 MiB of this block and 1 MiB from before are freed
        c = torch.empty(MIB // 8)  # 0.5 MiB: 2.5 MiB of this block held, below the peak
    assert meter.peak_bytes == 7 + 3 * MIB
    del b, c


def test_allocator_peak_of_a_step_counts_what_the_tensor_estimate_misses():
    """One training step of a 2-layer MLP: the allocator sees the saved activations (the
    estimate's part), the backward's gradient buffers and the optimizer's moments."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(1024, 256), torch.randint(0, 8, (1024,))
    weights = sum(p.numel() * 4 for p in model.parameters())
    saved = SavedActivationMeter(model.parameters())
    with AllocatorPeak("cpu", resident_bytes=weights) as meter:
        with saved.measure():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    # saved: the input (for the first weight's gradient) and the ReLU output (for ReLU's and
    # the second weight's gradients), and cross-entropy's log-probabilities
    # (int64 targets), plus a scalar or two
    expected_saved = (1024 * 256 + 1024 * 512 + 1024 * 8) * 4 + 1024 * 8
    assert 0 <= saved.peak_bytes - expected_saved <= 16
    # the gradients and the two AdamW moments (3 x weights) are held at the end of the step
    assert meter.peak_bytes >= weights + saved.peak_bytes
    assert meter.peak_bytes >= 4 * weights + 1024 * 8 * 4
    assert meter.peak_bytes < 4 * weights + 4 * saved.peak_bytes  # nothing unrelated counted


def _statm_resident_bytes() -> int:
    """Resident pages from /proc/self/statm (another file than the one process_memory reads)."""
    import os
    return int(open("/proc/self/statm", encoding="ascii").read().split()[1]) * os.sysconf(
        "SC_PAGE_SIZE")


def test_process_memory_is_the_resident_set_and_its_peak():
    # in a fresh interpreter: in the full suite, the garbage and allocator state of earlier
    # tests once hid 45 MiB of the block's growth, and once kept the freed block resident
    code = ("import gc; gc.disable(); from tests.unit.test_measurement import "
            "_measure_a_block; _measure_a_block()")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2])


def _measure_a_block() -> None:
    before = process_memory()
    block = torch.ones(128 * 2**20 // 4)  # 128 MiB, written, so resident (its own mapping)
    during = process_memory()
    statm = _statm_resident_bytes()
    # at least half the block: file-backed pages (mapped model files) may leave the resident
    # set meanwhile on a busy machine
    assert during.resident_bytes - before.resident_bytes >= 64 * 2**20
    assert abs(during.resident_bytes - statm) < 16 * 2**20  # resident, not the virtual size
    assert during.peak_resident_bytes >= during.resident_bytes
    del block
    after = process_memory()
    assert after.resident_bytes < during.resident_bytes - 64 * 2**20  # freed: returned
    # the peak remembers it (the kernel's counters agree to a few hundred KiB)
    assert after.peak_resident_bytes >= during.resident_bytes - 2**20
