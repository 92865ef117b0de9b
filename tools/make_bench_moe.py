"""Write an LLM-shaped random MoE folder for `hfedmoe bench step` (docs/hfedmoe.md).

Where the embedded MiniLM-MoE's experts are a minority of its compute, an MoE LLM's routed
experts hold most of its parameters and FLOPs. This writes an OLMoE-layout model (transformers'
``OlmoeForCausalLM``, random weights drawn from a fixed seed) whose experts dominate: 4 layers,
hidden 256, 32 experts per layer of intermediate size 256, top-4, with MiniLM's tokenizer
(vocabulary 30,522) so that it runs offline on the BBC News corpus:

    .venv/bin/python tools/make_bench_moe.py runs/bench-moe
    .venv/bin/hfedmoe bench step --config conf/bench/llm_shaped.toml \\
        --set model.name=runs/bench-moe --budgets 32,64,128 --json runs/bench-moe.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

from hfedmoe.model.minilm import minilm_model_dir


def make(folder: Path) -> None:
    config = transformers.OlmoeConfig(
        vocab_size=30522, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_experts=32, num_experts_per_tok=4,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=None, eos_token_id=102,
        tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    transformers.OlmoeForCausalLM(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm_model_dir()).save_pretrained(folder)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tools/make_bench_moe.py FOLDER")
    make(Path(sys.argv[1]))
