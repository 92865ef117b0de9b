"""smollm2-moe: the real SmolLM2-135M-Instruct (offline GGUF) converted once to a plain dense
folder and upcycled into a stock Mixtral layout. Checked on the real weights, truncated to 2
layers to stay cheap: with every expert active and a uniform router the MoE computes the
dense logits; a saved MoE folder loads with stock AutoModelForCausalLM and gives the same
logits; the conversion cache is keyed by the GGUF file's content."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from hfedmoe.model import smollm2

LAYERS = 2


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    folder = smollm2.dense_folder(root)
    llama = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return root, folder, llama, tokenizer


def truncated(llama: transformers.LlamaForCausalLM, layers: int = LAYERS):
    small = copy.deepcopy(llama)
    small.model.layers = small.model.layers[:layers]
    small.config.num_hidden_layers = layers
    return small.eval()


def assert_same_logits(moe, dense, inputs) -> None:
    """Equal logits at every real token (float tolerance)."""
    with torch.no_grad():
        expected = dense(**inputs).logits
        got = moe(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert torch.allclose(got[mask], expected[mask], atol=2e-4, rtol=1e-4)


def batch(tokenizer):
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
        add_generation_prompt=True)
    return tokenizer([chat, "The match ended two goals to one."], return_tensors="pt",
                     padding=True)


def test_dense_folder_is_the_gguf_model_and_is_cached(dense):
    root, folder, llama, tokenizer = dense
    assert llama.config.num_hidden_layers == 30 and llama.config.hidden_size == 576
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    gguf = smollm2.gguf_path()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    inputs = batch(tokenizer)
    with torch.no_grad():
        same = llama.eval()(**inputs).logits
        reference = loaded.eval()(**inputs).logits
    assert torch.equal(same, reference)  # the conversion loses nothing
    assert smollm2.dense_folder(root) == folder  # reused, not rebuilt
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 1


@pytest.mark.parametrize("num_experts", [4, 8])
def test_all_experts_with_a_uniform_router_compute_the_dense_logits(dense, num_experts):
    _, _, llama, tokenizer = dense
    small = truncated(llama)
    moe = smollm2.upcycle_llama(small, num_experts, top_k=num_experts, split="neurons").eval()
    for layer in moe.model.layers:
        layer.mlp.gate.weight.data.zero_()  # uniform router: every gate 1 / E
    assert_same_logits(moe, small, batch(tokenizer))
    # and the split is a permutation of the dense neurons: parameter counts are equal
    assert sum(p.numel() for p in moe.model.layers[0].mlp.experts.parameters()) == \
        sum(p.numel() for p in small.model.layers[0].mlp.parameters())


def test_copies_compute_the_dense_logits_for_any_top_k(dense):
    """Sparse upcycling: every expert is the whole MLP and the gates sum to 1, so a top-2
    router of random weights changes nothing before training."""
    _, _, llama, tokenizer = dense
    small = truncated(llama)
    moe = smollm2.upcycle_llama(small, 4, top_k=2, split="copies", seed=1).eval()
    router = moe.model.layers[0].mlp.gate.weight
    assert router.std() > 0.01 and not torch.equal(router[0], router[1])  # routes differ
    assert_same_logits(moe, small, batch(tokenizer))
    experts = moe.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * 1536, 576)


def test_saved_moe_loads_with_stock_transformers(dense, tmp_path):
    _, _, llama, tokenizer = dense
    small = truncated(llama)
    means = smollm2.mlp_input_means(small, tokenizer, smollm2.CALIBRATION_TEXTS)
    moe = smollm2.upcycle_llama(small, 8, top_k=2, input_means=means, split="neurons").eval()
    moe.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    assert reloaded.config.num_local_experts == 8 and reloaded.config.num_experts_per_tok == 2
    inputs = batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**inputs).logits, moe(**inputs).logits)
    # the initialised router spreads tokens: no expert takes most of a layer's routed slots
    with torch.no_grad():
        out = moe(**inputs, output_router_logits=True)
    mask = inputs["attention_mask"].reshape(-1).bool()
    for logits in out.router_logits:
        chosen = logits[mask].topk(2, dim=-1).indices.reshape(-1)
        share = torch.bincount(chosen, minlength=8).max().item() / chosen.numel()
        assert share < 0.5


def test_neuron_split_rejects_an_expert_count_that_does_not_divide_the_mlp(dense):
    with pytest.raises(ValueError, match="must divide the MLP size 1536"):
        smollm2.mixtral_config(dense[2].config, 7, 2, split="neurons")
    assert smollm2.mixtral_config(dense[2].config, 7, 2, split="copies").num_local_experts == 7


def test_model_name_smollm2_moe_loads_the_cached_upcycled_model(dense, monkeypatch):
    """``model.name = "smollm2-moe"`` resolves to the cached Mixtral folder of model.num-experts
    and model.top-k (made once), whose experts hfedmoe's adapter converts like any Mixtral."""
    from hfedmoe.config import parse_run_config
    from hfedmoe.fingerprint import model_fingerprint
    from hfedmoe.model.loading import load_adapter, load_tokenizer, model_folder

    root = dense[0]
    monkeypatch.setenv("HFEDMOE_CACHE", str(root))
    cfg = parse_run_config({"model.name": "smollm2-moe", "model.num-experts": 2,
                            "model.top-k": 1}).model
    folder = model_folder(cfg)
    assert folder.startswith(str(root)) and folder.endswith("-moe-copies-2x1")
    assert model_folder(cfg) == folder and model_fingerprint(cfg) == model_fingerprint(cfg)
    tokenizer = load_tokenizer(cfg)
    adapter = load_adapter(cfg, num_labels=3, seed=0)
    geometry = adapter.geometry
    assert (geometry.num_layers, geometry.num_experts, geometry.top_k) == (30, 2, 1)
    encoded = tokenizer(["The capital of France is Paris."], return_tensors="pt")
    with torch.no_grad():
        logits = adapter.model(encoded["input_ids"], encoded["attention_mask"])
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
