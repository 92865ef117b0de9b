"""The classifier a classification run leaves behind: reloaded, it computes the same logits."""

import pytest
import torch

from hfedmoe.cli import main
from hfedmoe.config import parse_run_config
from hfedmoe.model import load_tokenizer
from hfedmoe.model.export import export_classifier, load_classifier
from hfedmoe.model.state import set_trainable
from hfedmoe.tasks import task_for


@pytest.mark.parametrize("name", ["tiny:qwen2_moe", "tiny:switch_transformers", "minilm-moe"])
def test_exported_classifier_reloads_with_the_same_logits(tmp_path, name, capsys):
    config = parse_run_config({"model.name": name, "seed": 3})
    task = task_for("classification")
    adapter = task.build_adapter(config.model, 3, config.seed)
    with torch.no_grad():  # "trained": every trainable tensor moved from its init
        for p in set_trainable(adapter, "all").values():
            p.add_(0.05 * torch.randn_like(p))
    tokenizer = load_tokenizer(config.model)
    export_classifier(adapter, tokenizer, tmp_path / "m", config.model, config.seed,
                      ["sport", "tech", "politics"])
    loaded, loaded_tokenizer, labels = load_classifier(tmp_path / "m")
    assert labels == ["sport", "tech", "politics"]
    batch = loaded_tokenizer(["the match ended in a draw", "a new phone"], padding=True,
                             return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        ours = adapter.model(batch["input_ids"], batch["attention_mask"])
        theirs = loaded.model(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(ours, theirs)
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "m"), "--text",
                 "the match ended in a draw"]) == 0
    assert capsys.readouterr().out.strip() == labels[int(ours[0].argmax())]


def test_a_folder_that_is_no_classifier_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["predict", "--model", str(tmp_path), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a classifier exported by hfedmoe" in err
