"""What upcycling costs SmolLM2 before any fine-tuning: perplexity and a greedy answer.

    .venv/bin/python tools/measure_smollm2_upcycle.py [--experts 8] [--top-k 1,2,4,8]
        [--split copies|neurons]

Builds (or reuses) the cached dense SmolLM2 and one upcycled Mixtral folder per top-k
(hfedmoe.model.smollm2), then reports for each: the perplexity of its own next-token
predictions on the calibration sentences and on the WordNet glosses' first 64 entries (if
installed), and the greedy answer to one chat question. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import transformers

from hfedmoe.model import smollm2

QUESTION = "What is the capital of France?"
WORDNET = Path("/usr/share/wordnet/data.noun")


def texts() -> list[str]:
    found = list(smollm2.CALIBRATION_TEXTS)
    if WORDNET.is_file():
        glosses = [line.split("|", 1)[1].strip() for line in WORDNET.read_text(
            encoding="latin-1").splitlines() if "|" in line and not line.startswith(" ")]
        found += glosses[:64]
    return found


def perplexity(model, tokenizer, sentences: list[str]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for sentence in sentences:
            ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def answer(model, tokenizer) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", default="1,2,4,8")
    parser.add_argument("--split", default=smollm2.DEFAULT_SPLIT, choices=smollm2.SPLITS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    sentences = texts()
    dense = smollm2.dense_folder()
    rows = []
    models = [("dense", dense)] + [(f"{args.experts} {args.split}, top-{k}",
                                    smollm2.moe_folder(args.experts, int(k), split=args.split))
                                   for k in args.top_k.split(",")]
    for label, folder in models:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        rows.append((label, perplexity(model, tokenizer, sentences),
                     answer(model, tokenizer).replace("\n", " ")))
    print(f"{len(sentences)} sentences; question: {QUESTION!r}\n")
    print("| model | perplexity | greedy answer |\n|---|---|---|")
    for label, ppl, text in rows:
        print(f"| {label} | {ppl:.1f} | {text} |")


if __name__ == "__main__":
    main()
