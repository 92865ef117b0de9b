"""Sequence classifier on top of any transformers base model: masked mean pooling + linear head.

Parameter names start with ``backbone.`` (the transformers base model) or ``classifier.``
(the head); the adapter's ``non_expert_parameters("head")`` relies on that prefix.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_PREFIX = "classifier."


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the tokens where ``attention_mask`` (B, T) is 1.

    A row without any real token pools to zeros (never NaN).
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden * mask).sum(dim=1)  # (B, H)
    return summed / mask.sum(dim=1).clamp_min(1.0)  # (B, H)


def mixed_precision(model: nn.Module, device: torch.device):
    """Autocast to ``model.autocast_dtype`` (``model.precision``; set by the loader) on
    ``device``; a no-op context when it is None."""
    dtype = getattr(model, "autocast_dtype", None)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class MoEClassifier(nn.Module):
    """``logits (B, C) = classifier(masked_mean(backbone(input_ids, mask).last_hidden_state))``,
    float32 (under ``model.precision = "bf16-mixed"`` computed in bf16 autocast)."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.backbone = backbone
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (batch, seq_len); got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        with mixed_precision(self, input_ids.device):
            hidden = self.backbone(input_ids=input_ids,
                                   attention_mask=attention_mask).last_hidden_state
            logits = self.classifier(masked_mean(hidden, attention_mask))
        return logits.float()  # (B, C)
