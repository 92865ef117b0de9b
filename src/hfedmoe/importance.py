"""Expert importance and the information-bottleneck score of one local batch (pure).

method.md sections 1-2. Input everywhere is ``sample_probs`` = G_e(x_i), shape (L, B, S): per
MoE layer, per sample of the batch, per routed expert, the router probability of the sample
(for text: the mean over its non-padding tokens, see ``hfedmoe.training.sample_probabilities``).
All functions are pure: tensors in, tensors out, same device and dtype as the input, no grad.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def _check_sample_probs(sample_probs: torch.Tensor) -> None:
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs must be (L, B, S), got shape {tuple(sample_probs.shape)}")
    if sample_probs.shape[1] < 1:
        raise ValueError("sample_probs has no samples (B = 0)")
    if not bool(torch.isfinite(sample_probs).all()) or bool((sample_probs < 0).any()):
        raise ValueError("sample_probs must be finite and >= 0 (router probabilities)")


def expert_importance(sample_probs: torch.Tensor, lam: float) -> torch.Tensor:
    """s(e) = lam * s_cumul(e) + (1 - lam) * s_spec(e)  (Eqs. 3-5), shape (L, S).

    s_cumul(e) = mean_i G_e(x_i) (Eq. 3); s_spec(e) = max_i G_e(x_i) (Eq. 4).
    ``lam`` must lie in [0, 1].
    """
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    _check_sample_probs(sample_probs)
    probs = sample_probs.detach()  # (L, B, S)
    cumulative = probs.mean(dim=1)  # (L, S)  Eq. 3
    specific = probs.amax(dim=1)  # (L, S)  Eq. 4
    return lam * cumulative + (1.0 - lam) * specific  # Eq. 5


def routing_kl(sample_probs: torch.Tensor) -> torch.Tensor:
    """KL_e = mean_i G_e(x_i) * log(G_e(x_i) / p(z_e))  (Eqs. 10-11), shape (L, S).

    Prior p(z_e) = mean_j G_e(x_j) over the batch (Eq. 10). Conventions: 0 * log 0 = 0, and a
    term whose prior is 0 counts 0 (with G >= 0 that happens only when every G_e(x_j) is 0, or
    when the mean underflows). By the log-sum inequality KL_e >= 0, with equality iff expert e
    gets the same probability from every sample; it measures how input-specific e's routing is.
    """
    _check_sample_probs(sample_probs)
    probs = sample_probs.detach()  # (L, B, S)
    prior = probs.mean(dim=1, keepdim=True).expand_as(probs)  # (L, B, S)  p(z_e)
    defined = (probs > 0) & (prior > 0)
    ratio = torch.where(defined, probs / torch.where(defined, prior, 1.0), 1.0)  # log 1 = 0
    terms = torch.where(defined, probs * torch.log(ratio), 0.0)  # (L, B, S)
    return terms.mean(dim=1).clamp_min(0.0)  # (L, S); clamp removes -1e-9 rounding only


def ib_score(importance: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """I_b(e) = s(e) - beta * KL_e  (Eq. 14), shape (L, S). ``beta`` must be >= 0.

    beta = 0 gives exactly ``importance`` (ranking by importance alone).
    """
    if not (beta >= 0.0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if importance.shape != kl.shape:
        raise ValueError(f"importance {tuple(importance.shape)} and KL {tuple(kl.shape)} differ")
    if beta == 0.0:
        return importance.clone()
    return importance - beta * kl


def routed_experts(top_k_index: Sequence[torch.Tensor], token_mask: torch.Tensor,
                   num_experts: int) -> torch.Tensor:
    """E_union: the experts in the top-k of at least one real token of the batch, (L, S) bool.

    ``top_k_index[l]``: (tokens, k) int experts chosen per token in MoE layer l, where the value
    ``num_experts`` marks a dropped slot (capacity overflow) and is ignored. ``token_mask``:
    (tokens,) bool, True for real (non-padding) tokens, in the same token order.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    routed = torch.zeros(len(top_k_index), num_experts, dtype=torch.bool)  # (L, S)
    mask = token_mask.reshape(-1).bool().cpu()  # (tokens,)
    for layer, index in enumerate(top_k_index):
        if index.dim() != 2 or index.shape[0] != mask.shape[0]:
            raise ValueError(f"top_k_index[{layer}] has shape {tuple(index.shape)}, "
                             f"expected ({mask.shape[0]}, k)")
        chosen = index.detach().cpu()[mask].reshape(-1)  # (real tokens * k,)
        if bool(((chosen < 0) | (chosen > num_experts)).any()):
            raise ValueError(f"top_k_index[{layer}] has values outside [0, {num_experts}]")
        routed[layer, chosen[chosen < num_experts]] = True
    return routed
