"""Task causal-lm end to end, in-process: the shipped tiny-lm config learns (held-out loss and
perplexity fall), every method runs on it within its budgets, and the final model loads with
stock transformers and answers through ``hfedmoe generate``."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfedmoe.checkpoint import load_latest
from hfedmoe.cli import main
from hfedmoe.config import METHODS, SPLIT_METHODS, load_config_file, parse_run_config
from hfedmoe.federation.grids import InProcessGrid
from hfedmoe.federation.client_app import make_client_app
from hfedmoe.federation.server_app import run_server
from hfedmoe.model.state import set_trainable, write_state
from hfedmoe.tasks import task_for
from hfedmoe.tasks.causal_lm import causal_lm_loss

pytestmark = pytest.mark.slow
TINY_LM = load_config_file("conf/tiny-lm.toml")


def run(tmp_path, **overrides):
    config = parse_run_config(TINY_LM, {"out": str(tmp_path / "run"), **overrides})
    grid = InProcessGrid(make_client_app(), config.data.num_clients)
    return config, run_server(grid, config)


def test_tiny_lm_learns_and_leaves_a_model_transformers_loads(tmp_path, capsys):
    config, summary = run(tmp_path)
    assert summary["task"] == "causal-lm" and summary["trained_rounds"] == 3
    perplexity = summary["perplexity_by_round"]
    assert perplexity[-1] < 0.1 * perplexity[0]  # measured: ~31,000 -> ~290
    assert summary["final_perplexity"] == pytest.approx(perplexity[-1])
    assert summary["loss_by_round"][-1] < summary["loss_by_round"][0] - 2.0
    for key in ("final_exact_match", "final_rouge_l"):
        assert 0.0 <= summary[key] <= 1.0
    lines = [json.loads(l) for l in (tmp_path / "run" / "generations.jsonl").read_text()
             .splitlines()]
    assert [l["round"] for l in lines] == [0, 1, 2, 3]
    assert len(lines[-1]["samples"]) == config.generate.examples
    assert set(lines[-1]["samples"][0]) == {"prompt", "reference", "generation"}

    # the exported model is the final global model: stock transformers reproduces its loss
    folder = tmp_path / "run" / "final-model"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = task_for("causal-lm")
    adapter = task.build_adapter(config.model, 0, config.seed)
    write_state(set_trainable(adapter, config.model.trainable_non_expert),
                load_latest(tmp_path / "run" / "checkpoints").global_state)
    batch = tokenizer(["What is the capital of France?"], return_tensors="pt",
                      return_token_type_ids=False)
    with torch.no_grad():
        ours = adapter.model(batch["input_ids"], batch["attention_mask"])
        theirs = model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    labels = batch["input_ids"].clone()
    with torch.no_grad():
        assert float(model(**batch, labels=labels).loss) == pytest.approx(
            float(causal_lm_loss(theirs, labels)), rel=1e-5)

    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--prompt", "What is the capital of "
                 "France?", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr()
    assert printed.out.endswith("\n")
    # a tiny random model may answer nothing: then, and only then, a note says so
    assert (printed.out.strip() == "") == ("greedy answer is empty" in printed.err)


@pytest.mark.parametrize("method", [m for m in METHODS if not m.endswith(
    ("-no-gate", "-no-reg", "-no-consistency"))])  # the FedAlign ablations: configurations
def test_every_method_runs_on_causal_lm_within_its_budgets(tmp_path, method):
    config, summary = run(tmp_path, method=method, **{
        "num-server-rounds": 1, "train.local-steps": 3, "generate.examples": 2,
        "checkpoint.every": 0, "budget.experts": "2,4,16"})
    assert summary["trained_rounds"] == 1, method
    assert summary["final_loss"] < summary["loss_by_round"][0], method
    clients = summary["clients"]
    if method in SPLIT_METHODS:  # no budgets: every client's part is the same cut
        # (block 0: 8 experts); activations of (B, T) token labels went up
        assert [c["max_active_experts_per_batch"] for c in clients] == [8, 8, 8, 8]
        assert summary["bytes_up_activations"] > 0
        return
    assert [c["budget_experts"] for c in clients] == [2, 4, 16, 2]
    ignores_budgets = method in ("fedavg", "fedavg-full", "fedalign")
    assert all(c["within_budget"] for c in clients) != ignores_budgets, clients


@pytest.mark.parametrize("aggregation, quantization, targets", [
    ("factors", "none", "experts"), ("frozen-a", "none", "experts"), ("factors", "nf4", "experts"),
    ("factors", "none", "experts+attention")])
def test_lora_run_leaves_a_merged_model_and_an_adapter_peft_loads(tmp_path, aggregation,
                                                                  quantization, targets):
    """A LoRA run's final-model/ is the merged model, final-model/base the base it started
    from (dequantized when the experts were held quantized) and final-model/adapter a peft
    adapter: peft's model on the base and the merged model both reproduce hfedmoe's own
    logits of the final global state (LoRA unmerged, quantized where it trained so)."""
    from peft import PeftModel

    from hfedmoe.client import build_model

    config, _ = run(tmp_path, method="hfedmoe", **{
        "num-server-rounds": 1, "train.local-steps": 4, "generate.examples": 0,
        "budget.experts": "4,8,16", "train.adapter": "lora", "lora.rank": 4,
        "lora.aggregation": aggregation, "model.quantization": quantization,
        "lora.targets": targets,
        # attention factors need the attention weights frozen (tiny-lm trains them: "all")
        "model.trainable-non-expert": "head" if targets == "experts+attention" else "all"})
    folder = tmp_path / "run" / "final-model"
    adapter = build_model(config, 0)
    final = load_latest(tmp_path / "run" / "checkpoints").global_state
    write_state(set_trainable(adapter, config.model.trainable_non_expert), final)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["What is the capital of France?", "Name a prime number."],
                      return_tensors="pt", padding=True, return_token_type_ids=False)
    base = AutoModelForCausalLM.from_pretrained(folder / "base").eval()
    with torch.no_grad():
        ours = adapter.model(batch["input_ids"], batch["attention_mask"])
        merged = AutoModelForCausalLM.from_pretrained(folder).eval()(**batch).logits
        before = base(**batch).logits
        peft_model = PeftModel.from_pretrained(base, folder / "adapter").eval()
        theirs = peft_model(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], merged[real], atol=1e-4)
    assert torch.allclose(ours[real], theirs[real], atol=1e-4)
    assert (ours[real] - before[real]).abs().max() > 1e-2  # the adapter changes the model
    # the adapter holds the experts' factors and the trained modules, not the base weights
    lora_params = [n for n, _ in peft_model.named_parameters() if ".lora_" in n]
    attention = 2 * len(adapter.attention_factors())  # A, B of each attention projection
    assert len(lora_params) == 2 * 2 * adapter.geometry.num_layers + attention  # experts: 2 proj.
    assert (attention > 0) == (targets == "experts+attention")
    size = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < (folder / "base" / "model.safetensors").stat().st_size


def test_packing_trains_on_the_same_examples_in_fewer_rows(tmp_path):
    """train.packing: the clients report the same examples as unpacked, hfedmoe's per-sample
    statistics see each example (usage rows still sum to 1: validation accepts every reply),
    and the run learns."""
    from hfedmoe.report import read_metrics

    runs = {}
    for packing in (False, True):
        config, summary = run(tmp_path / str(packing), method="hfedmoe", **{
            "num-server-rounds": 2, "train.local-steps": 4, "generate.examples": 0,
            "checkpoint.every": 0, "train.packing": packing, "budget.experts": "4,8,16"})
        assert summary["final_loss"] < summary["loss_by_round"][0] - 0.5, packing
        runs[packing] = read_metrics(tmp_path / str(packing) / "run")
    for plain, packed in zip(runs[False][1:], runs[True][1:]):
        assert not packed["failures"] and len(packed["clients"]) == config.data.num_clients
        assert sorted(c["num_examples"] for c in plain["clients"]) == sorted(
            c["num_examples"] for c in packed["clients"])
