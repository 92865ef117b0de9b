"""Local model folders as users have them (issue "Inputs users really have", items 1 and 9).

A tiny Qwen2-MoE folder whose tokenizer adds no BOS/CLS token (Qwen/OLMoE style), so an empty
text, or one the tokenizer normalises away, becomes a row of padding only; and folders missing
their weights or tokenizer files. Runs are in-process through the command line's ``main``.
"""

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from hfedmoe.cli import main
from hfedmoe.model import switch
from hfedmoe.model.hf_moe import tiny_config
from hfedmoe.report import read_metrics

WORDS = ("shares rose fell the bank profit firm cut jobs sales oil prices match won lost goal "
         "team film star award music band vote party minister election phone software chip "
         "web users said report quick brown fox jumps over lazy dog .").split()
CLASSES = {"business": WORDS[0:10], "sport": WORDS[10:16]}


def _tokenizer(folder):
    """Word-level, no special tokens added; '#' is normalised away, so '###' has no token."""
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Replace("#", ""), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                                unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return len(vocab)


def _model(folder, vocab_size, family="qwen2_moe"):
    config = tiny_config(family)
    config.vocab_size, config.pad_token_id, config.bos_token_id = vocab_size, 0, None
    config.eos_token_id = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.Qwen2MoeForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def no_bos_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("no-bos-model")
    _model(folder, _tokenizer(folder))
    return folder


def _rows(number):
    rows = []
    for i in range(number):
        label = sorted(CLASSES)[i % 2]
        words = CLASSES[label]
        rows.append({"text": " ".join(words[(i + j) % len(words)] for j in range(6)),
                     "label": label})
    return rows


def _run(tmp_path, model, data, *extra):
    return main(["run", "--config", "conf/tiny.toml", "--set", f"model.name={model}",
                 "--set", "data.source=file", "--set", f"data.path={data}",
                 "--set", "data.num-clients=2", "--set", "data.min-partition-size=1",
                 "--set", "num-server-rounds=2", "--set", "model.max-length=16",
                 *extra, "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("bad_texts", [[""], ["   ", "\t", " \n "], ["###", "# #"]],
                         ids=["empty", "whitespace", "normalised-away"])
def test_rows_without_tokens_never_get_an_honest_client_rejected(
        tmp_path, monkeypatch, capsys, no_bos_model, bad_texts):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    rows = _rows(40)
    for i, text in enumerate(bad_texts):  # among the rows, not only at the end
        rows.insert(7 * (i + 1), {"text": text, "label": rows[0]["label"]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    status = _run(tmp_path, no_bos_model, data)
    out, err = capsys.readouterr()
    assert status == 0, out[-3000:] + err[-3000:]
    assert f"dropped {len(bad_texts)}" in out  # reported, not silently lost
    records = read_metrics(tmp_path / "out")[1:]
    assert all(r["failures"] == [] and r["aggregated"] for r in records)
    for record in records:
        for client in record["clients"]:
            usage = torch.tensor(client["usage"]).reshape(2, 8)  # 2 MoE layers x 8 experts
            torch.testing.assert_close(usage.sum(dim=1), torch.ones(2), atol=1e-4, rtol=0)


def test_a_folder_without_weights_is_named_in_one_line(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    vocab = _tokenizer(folder)
    config = tiny_config("qwen2_moe")
    config.vocab_size = vocab
    config.save_pretrained(folder)
    assert main(["run", "--config", "conf/tiny.toml", "--set", f"model.name={folder}",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights could not be loaded" in err[0] and str(folder) in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["qwen2_moe", "switch_transformers"])
def test_a_folder_without_tokenizer_files_is_refused(tmp_path, capsys, family):
    folder = tmp_path / "model"
    if family == "switch_transformers":  # transformers still builds a tokenizer for it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformers.SwitchTransformersForConditionalGeneration(
                switch.tiny_config(family)).save_pretrained(folder)
    else:
        _model(folder, 30522)
    status = main(["run", "--config", "conf/tiny.toml", "--set", f"model.name={folder}",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "tokenizer" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_knows_no_word_is_refused(tmp_path, capsys):
    """A tokenizer folder that loads but maps real words to <unk> (a mismatched vocabulary)."""
    folder = tmp_path / "model"
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "zzz": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(folder)
    _model(folder, len(vocab))
    status = main(["run", "--config", "conf/tiny.toml", "--set", f"model.name={folder}",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "unknown" in err[0], err


def test_an_unsupported_family_is_named_before_a_missing_tokenizer(tmp_path, capsys):
    folder = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32)).save_pretrained(folder)
    status = main(["run", "--config", "conf/tiny.toml", "--set", f"model.name={folder}",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "model_type 'bert' is not supported" in err[0], err
