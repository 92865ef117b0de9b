"""Held-out quality of a quantized frozen base (docs/lora.md, "A quantized frozen base").

For each ``model.quantization`` scheme given, builds the benchmark's model as a LoRA client does
(factors at their init, B = 0: the base itself) and prints its held-out loss, perplexity and
next-token accuracy on the global test split, with the bytes its routed experts are held in.

    .venv/bin/python tools/quantized_perplexity.py none int8 nf4
    .venv/bin/python tools/quantized_perplexity.py --config conf/tiny-lm.toml none nf4
"""

from __future__ import annotations

import argparse
import time

import torch

from hfedmoe.client import build_model, load_usable_corpus
from hfedmoe.config import QUANTIZATIONS, load_config_file, parse_run_config
from hfedmoe.model import load_tokenizer
from hfedmoe.model.quantize import stored_bytes
from hfedmoe.tasks import task_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schemes", nargs="+", choices=QUANTIZATIONS)
    parser.add_argument("--config", default="conf/bench/instruct.toml")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    flat = load_config_file(args.config)
    task = task_for("causal-lm")
    for scheme in args.schemes:
        config = parse_run_config(flat, {"train.adapter": "lora",
                                         "model.quantization": scheme})
        tokenizer = load_tokenizer(config.model)
        test = task.tokenize(load_usable_corpus(config, tokenizer).test, tokenizer,
                             config.model.max_length)
        adapter = build_model(config, 0)
        started = time.perf_counter()
        with torch.no_grad():
            result = task.evaluate(adapter, test, args.batch_size)
        experts = sum(stored_bytes(bank) for bank in adapter.banks)
        print(f"{scheme}: {len(test)} held-out pairs, loss {result.loss:.4f}, perplexity "
              f"{result.metrics['perplexity']:.3f}, next-token accuracy {result.accuracy:.4f}, "
              f"routed experts held in {experts / 2**20:.1f} MiB, evaluation "
              f"{time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
