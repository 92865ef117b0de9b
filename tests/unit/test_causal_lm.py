"""Task causal-lm on tiny models: the loss, evaluation, greedy decoding and the export, each
against an independent computation (transformers' own loss and generate, a stock reload)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfedmoe.config import parse_run_config
from hfedmoe.data import DataError, TextDataset
from hfedmoe.data.corpora import Corpus
from hfedmoe.data.instructions import IGNORE_INDEX
from hfedmoe.model import UnsupportedModelError, load_tokenizer
from hfedmoe.model.causal_lm import export_causal_lm, greedy_generate
from hfedmoe.model.hf_moe import FUSED_FAMILIES
from hfedmoe.model.state import set_trainable
from hfedmoe.tasks import task_for
from hfedmoe.tasks.causal_lm import causal_lm_loss, normalise_answer

TASK = task_for("causal-lm")


def lm_config(family="qwen2_moe", **extra):
    return parse_run_config({"task": "causal-lm", "model.name": f"tiny:{family}", **extra})


def lm_adapter(family="qwen2_moe", seed=0):
    return TASK.build_adapter(lm_config(family).model, 0, seed)


def batch_with_labels(vocab=30522, rows=3, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # the prompt
    labels[mask == 0] = IGNORE_INDEX
    return ids, mask, labels


def test_loss_is_transformers_causal_lm_loss_on_response_tokens():
    adapter = lm_adapter()
    ids, mask, labels = batch_with_labels()
    with torch.no_grad():
        ours = causal_lm_loss(adapter.model(ids, mask), labels)
        theirs = adapter.model.hf_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
    # and by hand: -log p(token t+1 | ..t) over the learned positions
    with torch.no_grad():
        logp = torch.log_softmax(adapter.model(ids, mask), dim=-1)
    terms = [-logp[b, t - 1, labels[b, t]] for b in range(3) for t in range(1, 10)
             if labels[b, t] != IGNORE_INDEX]
    assert float(ours) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)


def test_evaluation_counts_response_tokens_and_perplexity_is_exp_loss():
    adapter = lm_adapter()
    ids, mask, labels = batch_with_labels()
    from hfedmoe.data.tokenize import TokenizedSet

    data = TokenizedSet(ids, mask, labels)
    result = TASK.evaluate(adapter, data, batch_size=2)  # two batches: token-weighted mean
    with torch.no_grad():
        logits = adapter.model(ids, mask)
    expected = float(causal_lm_loss(logits, labels))
    learned = labels[:, 1:] != IGNORE_INDEX
    right = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & learned
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.accuracy == pytest.approx(float(right.sum() / learned.sum()))
    assert result.num_examples == 3


def test_greedy_generation_is_the_argmax_continuation_of_the_forward():
    adapter = lm_adapter("mixtral")
    prompt = [101, 2054, 2003, 1996, 3007, 1997, 2605, 1029, 102]
    [answer] = greedy_generate(adapter.model, [prompt], max_new_tokens=6, stop_ids=[],
                               pad_id=0)
    ids = list(prompt)
    with torch.no_grad():  # no KV cache: the whole sequence through our forward each step
        for _ in range(6):
            logits = adapter.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
            ids.append(int(logits[0, -1].argmax()))
    assert answer == ids[len(prompt):]
    stop = answer[2]
    [cut] = greedy_generate(adapter.model, [prompt], 6, stop_ids=[stop], pad_id=0)
    assert cut == answer[: answer.index(stop)]


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_export_loads_with_stock_transformers_and_computes_the_same_logits(tmp_path, family):
    adapter = lm_adapter(family)
    params = set_trainable(adapter, "all")
    with torch.no_grad():  # trained-looking weights: every expert different from its init
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
    tokenizer = load_tokenizer(lm_config(family).model)
    export_causal_lm(adapter.model, adapter.banks, tokenizer, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids, mask, _ = batch_with_labels()
    with torch.no_grad():
        ours = adapter.model(ids, mask)
        theirs = reloaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert reloaded.config.model_type == family and reloaded.config.use_cache



@pytest.mark.parametrize("family,attention", [(f, False) for f in FUSED_FAMILIES + ("gpt_oss",)]
                         + [("qwen2_moe", True), ("gpt_oss", True)])
def test_peft_loads_the_lora_adapter_export_with_the_same_logits(tmp_path, family, attention):
    """Every expert's own (random) factors, re-laid out into peft's fused-expert LoRA: peft's
    model on the exported base computes hfedmoe's logits (the routers, trained, travel whole);
    with ``attention`` the attention projections' factors are peft's target_modules."""
    from peft import PeftModel

    from hfedmoe.model.lora import LoRASettings
    from hfedmoe.model.peft_export import export_peft_adapter

    adapter = lm_adapter(family)
    tokenizer = load_tokenizer(lm_config(family).model)
    export_causal_lm(adapter.model, adapter.banks, tokenizer, tmp_path / "base")
    settings = LoRASettings(rank=4, alpha=6.0, dropout=0.0)
    adapter.attach_lora(settings, seed=0, attention=attention)
    params = set_trainable(adapter, "head")
    assert bool(adapter.attention_factors()) == attention
    with torch.no_grad():  # trained-looking: every B non-zero, routers moved
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    export_peft_adapter(adapter.model.hf_model, adapter.banks, params.values(), settings,
                        tmp_path / "base", tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids, mask, _ = batch_with_labels()
    with torch.no_grad():
        ours = adapter.model(ids, mask)
        before = base(input_ids=ids, attention_mask=mask).logits
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(
            input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-4)
    assert (ours[real] - before[real]).abs().max() > 1e-2
    if attention:  # the adapter holds the attention factors as they are
        import json
        targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
            "target_modules"]
        inner = sorted(name.split(".", 1)[1] for name in targets)  # (model. / backbone.)
        assert inner == sorted(name.split(".", 1)[1] for name in adapter.attention_factors())
        assert {name.rsplit(".", 1)[1] for name in inner} == {"q_proj", "k_proj", "v_proj",
                                                              "o_proj"}

def test_usable_corpus_drops_pairs_whose_prompt_fills_max_length():
    tokenizer = load_tokenizer(lm_config().model)
    long = "word " * 80
    train = TextDataset(("short question?", long), (0, 0), ("all",), ("yes", "no"))
    test = TextDataset(("another?",), (0,), ("all",), ("fine",))
    kept = TASK.usable_corpus(Corpus(train, test, ("all",)), tokenizer, max_length=32)
    assert kept.train.texts == ("short question?",)
    assert kept.notes == ("dropped 1 train pair(s) whose prompt fills model.max-length = 32 "
                          "tokens",)
    with pytest.raises(DataError, match="no test pair leaves room"):
        TASK.usable_corpus(Corpus(train, TextDataset((long,), (0,), ("all",), ("x",)),
                                  ("all",)), tokenizer, max_length=32)


def test_encoders_and_non_decoder_families_are_refused_in_one_line():
    for name in ("minilm-moe", "tiny:switch_transformers"):
        config = parse_run_config({"task": "causal-lm", "model.name": name})
        with pytest.raises(UnsupportedModelError) as info:
            TASK.build_adapter(config.model, 0, 0)
        assert "\n" not in str(info.value) and "causal-lm" in str(info.value)


def test_exact_match_normal_form():
    assert normalise_answer("  Paris. ") == normalise_answer("paris")
    assert normalise_answer("New  York") == "new york"
    assert normalise_answer("Paris") != normalise_answer("Lyon")
