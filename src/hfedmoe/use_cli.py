"""``hfedmoe generate`` and ``hfedmoe predict``: use the model a run left in ``<out>/final-model``.

``generate`` loads a causal-LM folder with stock transformers (``AutoModelForCausalLM``,
``AutoTokenizer``), renders the prompt the way training did (the chat template, else the plain
format of hfedmoe.data.instructions), decodes greedily and prints the completion. ``predict``
loads a classifier written in hfedmoe's format (hfedmoe.model.export) and prints the label.
Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GENERATE_EXAMPLE = "hfedmoe generate --model runs/tiny-lm/final-model --prompt 'What is the capital of France?'"


def add_use_parsers(commands) -> None:
    gen = commands.add_parser(
        "generate", help="answer a prompt with a causal-LM final model",
        description="Load a causal-LM folder (e.g. <out>/final-model of a task = 'causal-lm' "
                    "run) with stock transformers and print its greedy answer to --prompt.",
        epilog=f"example:\n  {GENERATE_EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--model", required=True, metavar="DIR", help="a transformers model folder")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the user's prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                     help="the most tokens generated (default 64)")
    pred = commands.add_parser(
        "predict", help="label a text with a classification final model",
        description="Load the classifier in <out>/final-model of a classification run and "
                    "print the label it gives --text.")
    pred.add_argument("--model", required=True, metavar="DIR", help="a final-model folder")
    pred.add_argument("--text", required=True, metavar="TEXT", help="the text to classify")


def generate_answer(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer of the causal LM in ``folder`` to ``prompt`` (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfedmoe.data.instructions import end_token_id, prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_token_ids(tokenizer, prompt)])
    stops = sorted({t for t in (tokenizer.eos_token_id, end_token_id(tokenizer)) if t is not None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def predict_label(folder: Path, text: str) -> str:
    """The label the classifier in ``folder`` gives ``text``."""
    import torch

    from hfedmoe.model.export import load_classifier

    adapter, tokenizer, labels = load_classifier(folder)
    encoded = tokenizer([text], truncation=True, max_length=512, return_tensors="pt",
                        return_token_type_ids=False)
    with torch.no_grad():
        logits = adapter.model(encoded["input_ids"], encoded["attention_mask"])
    return labels[int(logits.argmax(dim=-1))]


def run_use(args: argparse.Namespace) -> int:
    folder = Path(args.model)
    if not (folder / "config.json").is_file() and not (folder / "hfedmoe-model.json").is_file():
        print(f"hfedmoe: error: --model '{folder}' is not a model folder (no config.json or "
              "hfedmoe-model.json)", file=sys.stderr)
        return 2
    try:
        if args.command == "generate":
            if args.max_new_tokens < 1:
                raise ValueError(f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
            if (folder / "hfedmoe-model.json").is_file():
                raise ValueError(f"'{folder}' is a classifier; use hfedmoe predict")
            answer = generate_answer(folder, args.prompt, args.max_new_tokens)
            print(answer)
            if not answer:  # an empty line alone looks like a failure
                print("hfedmoe: note: the greedy answer is empty (the model ended it at once, "
                      "or wrote only special tokens)", file=sys.stderr)
        else:
            print(predict_label(folder, args.text))
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"hfedmoe: error: --model '{folder}': {first}", file=sys.stderr)
        return 2
    return 0
