"""Causal language models of the fused MoE families: the training wrapper, greedy decoding and
the export to a stock transformers folder.

:class:`MoECausalLM` wraps a transformers ``*ForCausalLM`` whose experts were converted to
:class:`~hfedmoe.model.sparse_experts.SparseExperts` banks (hfedmoe.model.hf_moe): its forward
returns the ``*ForCausalLM``'s own logits (B, T, V) (the family's head: a linear layer, with
Cohere's logit scale or a soft cap where the family has one). Parameter names start
with ``backbone.`` (the transformers base model) or ``lm_head.`` (the head; with tied word
embeddings, as SmolLM2, the head IS the input embedding and is named only under
``backbone.``). The original ``*ForCausalLM`` object stays reachable as ``hf_model`` (not a
submodule: its parameters are the wrapper's) for transformers' ``generate``.

:func:`export_causal_lm` folds each bank back into the family's fused ``gate_up_proj``
(S, 2I, H) / ``down_proj`` (S, H, I) tensors and writes a folder that
``AutoModelForCausalLM.from_pretrained`` loads with no hfedmoe code.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from hfedmoe.model.classifier import mixed_precision
from hfedmoe.model.sparse_experts import SparseExperts


class MoECausalLM(nn.Module):
    """``logits (B, T, V)`` of the wrapped ``*ForCausalLM`` (module docstring)."""

    head_prefix = "lm_head."

    def __init__(self, causal_lm: PreTrainedModel) -> None:
        super().__init__()
        self.backbone = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") \
            else causal_lm.model
        self.lm_head = causal_lm.get_output_embeddings()
        object.__setattr__(self, "hf_model", causal_lm)  # not registered: no second names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids`` (B, T): a packed batch (hfedmoe.data.packing), whose positions
        restart at each example; the model then gets no attention mask and transformers
        builds the block-diagonal causal mask from the restarts."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be (batch, seq_len); got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        masks = ({"attention_mask": attention_mask} if position_ids is None
                 else {"position_ids": position_ids})
        # the family's own head computation (logit scaling, soft-capping where it has them)
        with mixed_precision(self, input_ids.device):
            logits = self.hf_model(input_ids=input_ids, use_cache=False, **masks).logits
        return logits.float()  # (B, T, V)


@torch.no_grad()
def greedy_generate(model: MoECausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Iterable[int], pad_id: int) -> list[list[int]]:
    """Greedy continuations of each prompt's token ids (one prompt at a time, KV cache on), at
    most ``max_new_tokens`` tokens, cut before the first of ``stop_ids``. The model's mode is
    restored afterwards."""
    lm = model.hf_model
    device = next(model.parameters()).device
    stops = sorted(set(stop_ids))
    training = model.training
    model.eval()
    answers = []
    try:
        for ids in prompts:
            input_ids = torch.tensor([list(ids)], dtype=torch.int64, device=device)
            with mixed_precision(model, device):
                out = lm.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  num_beams=1, eos_token_id=stops or None, pad_token_id=pad_id,
                                  use_cache=True, temperature=None, top_p=None, top_k=None)
            new = out[0, input_ids.shape[1]:].tolist()
            cut = next((i for i, token in enumerate(new) if token in stops), len(new))
            answers.append(new[:cut])
    finally:
        model.train(training)
    return answers


def fused_state_dict(causal_lm: nn.Module, banks: Sequence[SparseExperts]
                     ) -> dict[str, torch.Tensor]:
    """``causal_lm``'s state dict with every bank folded back into the fused layout: each
    expert's ``fused_tensors()`` (e.g. ``gate_up_proj`` (2I, H), ``down_proj`` (H, I); GPT-OSS
    transposed, with biases) are stacked into the family's fused tensors (S, ...) under the
    bank's own name (where the fused module was)."""
    names = {id(module): name for name, module in causal_lm.named_modules()}
    state = causal_lm.state_dict()
    for bank in banks:
        prefix = names[id(bank)] + "."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        per_expert = [e.fused_tensors() for e in bank.experts]
        for key in per_expert[0]:
            state[prefix + key] = torch.stack([tensors[key] for tensors in per_expert])
    return state


def export_causal_lm(model: MoECausalLM, banks: Sequence[SparseExperts], tokenizer: Any,
                     folder: Path) -> Path:
    """Write ``model`` as a stock transformers folder (config, safetensors weights, generation
    config, tokenizer) that ``AutoModelForCausalLM.from_pretrained(folder)`` loads; returns
    ``folder``. The exported config has ``use_cache`` on (training turned it off)."""
    lm = model.hf_model
    config = copy.deepcopy(lm.config)
    config.use_cache = True
    state = {k: v.detach().to("cpu") for k, v in fused_state_dict(lm, banks).items()}
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(state, strict=True, assign=True)
    fresh.tie_weights()
    folder.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
