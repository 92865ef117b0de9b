"""The meters against tensors whose sizes are known, and FLOP counts against hand counts."""

import torch
import torch.nn.functional as F

from hfedmoe.measurement import SavedActivationMeter, flop_counter


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
