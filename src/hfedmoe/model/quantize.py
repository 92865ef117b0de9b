"""A quantized frozen base for LoRA clients (``model.quantization``, QLoRA-style).

With ``train.adapter = "lora"`` the routed experts' own weights never change, so they can be
held quantized, as QLoRA does (Dettmers et al., 2023): a client's memory is then the quantized
experts plus its budgeted experts' factors and their training state. The schemes, both from
bitsandbytes (the QLoRA reference library; its CPU backend runs here):

* ``"nf4"`` - 4-bit NormalFloat in blocks of 64 weights with double quantization of the
  block scales (QLoRA's storage type: ``bitsandbytes.functional.quantize_4bit(quant_type=
  "nf4", blocksize=64, compress_statistics=True)``), about 4.13 bits per weight;
* ``"int8"`` - 8-bit integers with one absmax scale per output row (LLM.int8()'s weight format,
  ``int8_vectorwise_quant``), 8 bits + 32 per row.

Why bitsandbytes (docs/lora.md, "A quantized frozen base", measured): it is what QLoRA and
FlowerTune use, its NF4 is the paper's 4-bit type, and it quantizes a bare tensor, which our
per-expert weights are (torchao's affine primitives give a similar error at 4 bits; optimum-quanto
was last released in March 2025 and targets nn.Linear modules).

Mechanism: a :mod:`torch.nn.utils.parametrize` parametrization on each expert projection
weight. ``right_inverse`` quantizes (the stored ``original0``, ``original1``, ... are the codes
and the scales), ``forward`` dequantizes to float32: every read of
``expert.gate_up_proj`` (or ``expert.up.weight``) returns the dequantized weight, so the expert
kernels run unchanged. The grouped products of frozen weights do not keep the dequantized
weights for the backward (hfedmoe.model.sparse_experts.grouped_linear dequantizes again), so a
client holds dequantized weights of one group at a time. Quantization is deterministic: every
process of a run holds the same base.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from hfedmoe.config import QUANTIZATIONS

NF4_BLOCKSIZE = 64


class Dequantize(nn.Module):
    """Parametrization of one frozen weight (out, in): stored quantized, read as float32.

    ``right_inverse`` returns the stored tensors (torch keeps them as ``original0``, ...):
    int8: (codes int8 (out, in), row scales float32 (out,)); nf4: (packed codes uint8, then
    bitsandbytes' QuantState tensors: block scales, code books, packed metadata)."""

    def __init__(self, scheme: str, shape: torch.Size) -> None:
        super().__init__()
        if scheme not in QUANTIZATIONS[1:]:
            raise ValueError(f"quantization scheme must be one of {QUANTIZATIONS[1:]}; "
                             f"got {scheme!r}")
        self.scheme = scheme
        self.shape = tuple(shape)
        self._state_keys: tuple[str, ...] = ()  # nf4: the QuantState keys of the tensors
        self._cache: tuple[torch.device, object] | None = None

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Quantize ``weight`` (out, in): the tensors to store (class docstring)."""
        bnb = _bitsandbytes()
        weight = weight.detach().to(torch.float32)
        if self.scheme == "int8":
            codes, row_scale, _ = bnb.int8_vectorwise_quant(weight)  # (out, in), (out,)
            return codes, row_scale.to(torch.float32)
        packed, state = bnb.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                          compress_statistics=True)
        tensors = state.as_dict(packed=True)
        self._state_keys = tuple(tensors)
        self._cache = None
        return (packed, *tensors.values())

    def forward(self, stored: torch.Tensor, *state: torch.Tensor) -> torch.Tensor:
        """The dequantized weight (out, in), float32."""
        bnb = _bitsandbytes()
        if self.scheme == "int8":
            return bnb.int8_vectorwise_dequant(stored, state[0]).reshape(self.shape)
        if self._cache is None or self._cache[0] != stored.device:
            quant_state = bnb.QuantState.from_dict(dict(zip(self._state_keys, state)),
                                                   device=stored.device)
            self._cache = (stored.device, quant_state)
        return bnb.dequantize_4bit(stored, self._cache[1]).reshape(self.shape)


def quantize_weights(weights: Iterable[nn.Parameter], root: nn.Module, scheme: str) -> None:
    """Hold each of ``weights`` (parameters somewhere under ``root``) quantized with
    ``scheme`` (module docstring), frozen. ``"none"`` does nothing."""
    if scheme == "none":
        return
    owners = {id(p): (module, name) for module in root.modules()
              for name, p in module._parameters.items() if p is not None}
    for weight in list(weights):
        module, name = owners[id(weight)]
        weight.requires_grad_(False)
        parametrize.register_parametrization(module, name, Dequantize(scheme, weight.shape),
                                             unsafe=True)
        for stored in getattr(module.parametrizations, name).parameters():
            stored.requires_grad_(False)


def dequantize_weights(module: nn.Module) -> None:
    """Replace every quantized weight under ``module`` by its dequantized float32 value (a
    plain frozen parameter again), e.g. before LoRA factors are merged into it."""
    for sub in list(module.modules()):
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations.keys()):
                if isinstance(sub.parametrizations[name][0], Dequantize):
                    parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
                    getattr(sub, name).requires_grad_(False)


def stored_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer under ``module`` as held (quantized ones packed)."""
    return sum(t.numel() * t.element_size()
               for t in list(module.parameters()) + list(module.buffers()))


def _bitsandbytes():
    """``bitsandbytes.functional``, without its CPU backend's warning that an optional
    ``kernels`` package for ``gemm_4bit`` is missing (we dequantize and never call it)."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnb

    return bnb
