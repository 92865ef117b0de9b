"""Federated runs with per-expert LoRA (train.adapter = "lora") on the tiny model, in-process:
the run learns, every client uploads factors whose bytes follow the rank exactly, and the
model it leaves is a plain model with the updates merged into the expert weights."""

from __future__ import annotations

import io

import numpy
import pytest
import torch

from hfedmoe.config import load_config_file, parse_run_config
from hfedmoe.model import load_adapter
from hfedmoe.model.export import load_classifier
from hfedmoe.model.lora import LoRASettings
from hfedmoe.report import read_metrics
from hfedmoe.runner import run_experiment

TINY = "conf/tiny.toml"


def _run(tmp_path, rank: int, method: str = "fedavg", targets: str = "experts") -> list[dict]:
    out = tmp_path / f"{method}-r{rank}-{targets}"
    config = parse_run_config(load_config_file(TINY), {
        "out": str(out), "method": method, "budget.experts": "all", "num-server-rounds": 2,
        "train.adapter": "lora", "lora.rank": rank, "lora.alpha": 2.0 * rank,
        "train.lr": 0.01, "checkpoint.every": 0, "lora.targets": targets})
    run_experiment(config)
    return read_metrics(out)


def test_lora_runs_learn_upload_factors_by_rank_and_leave_a_merged_model(tmp_path):
    small, large = _run(tmp_path, 2), _run(tmp_path, 8)
    for records in (small, large):
        assert records[-1]["loss"] < records[0]["loss"]  # learned on the global test split
        assert all(len(r["clients"]) == 3 and not r["failures"] for r in records[1:])
    # independent count: each expert's factors hold r·(H + 2I) + r·(I + H) floats; fedavg
    # uploads every trainable tensor, so the rank changes only the factors' bytes
    base = load_adapter(parse_run_config(load_config_file(TINY)).model, num_labels=5, seed=0)
    expert = base.banks[0].experts[0]
    two_i, hidden = expert.gate_up_proj.shape
    per_rank = (hidden + two_i) + (two_i // 2 + hidden)  # floats per unit of rank, per expert
    experts = base.geometry.total_experts
    for r_small, r_large in zip(small[1:], large[1:]):
        for c_small, c_large in zip(r_small["clients"], r_large["clients"]):
            assert c_large["bytes_up"] - c_small["bytes_up"] == (8 - 2) * per_rank * experts * 4
    # the final model: a plain classifier (no factors) whose expert weights moved by B·A
    # while every frozen base weight outside the experts, routers and head stayed
    model, _, _ = load_classifier(tmp_path / "fedavg-r8-experts" / "final-model")
    assert all("lora" not in name for name in model.model.state_dict())
    moved = [not torch.equal(model.banks[0].experts[e].down_proj, base.banks[0].experts[e].down_proj)
             for e in range(base.geometry.num_experts)]
    assert any(moved)
    trained = set(model.non_expert_parameters("head"))
    for name, value in base.non_expert_parameters("all").items():
        if name not in trained:
            assert torch.equal(model.non_expert_parameters("all")[name], value), name


@pytest.mark.parametrize("aggregation, factors_per_expert", [("factors", 4), ("frozen-a", 2)])
def test_hfedmoe_with_lora_trains_only_budgeted_experts_factors(tmp_path, aggregation,
                                                               factors_per_expert):
    out = tmp_path / "hfedmoe-lora"
    config = parse_run_config(load_config_file(TINY), {
        "out": str(out), "method": "hfedmoe", "budget.experts": "4", "num-server-rounds": 1,
        "train.adapter": "lora", "lora.aggregation": aggregation, "checkpoint.every": 0})
    run_experiment(config)
    [record] = [r for r in read_metrics(out) if r["round"] == 1]
    for client in record["clients"]:
        assert 1 <= client["max_active_experts_per_batch"] <= 4
        # per trained expert its trained factors travel (A and B of two projections; B only
        # with frozen A), plus the routers (one tensor per MoE layer) and the head
        trained = sum(client["trained_experts"])
        assert client["uploaded_tensors"] == factors_per_expert * trained + 2 + 2


def test_attention_factors_travel_learn_and_merge_into_the_final_model(tmp_path):
    """lora.targets = "experts+attention": every client uploads each attention projection's A
    and B besides the experts' factors, the run learns, and the final model is a plain
    classifier whose attention weights moved (W + B·A merged) while embeddings did not."""
    experts, both = _run(tmp_path, 4), _run(tmp_path, 4, targets="experts+attention")
    assert both[-1]["loss"] < both[0]["loss"]
    base = load_adapter(parse_run_config(load_config_file(TINY)).model, num_labels=5, seed=0)
    base.attach_lora(LoRASettings(4, 8.0, 0.0), seed=0, attention=True)
    projections = base.attention_factors()
    # what travels per tensor: its .npy serialisation (a 128-byte header, then the floats)
    npy = [io.BytesIO() for _ in range(2 * len(projections))]
    for buffer, tensor in zip(npy, [t for f in projections.values() for t in (f.A, f.B)]):
        numpy.save(buffer, tensor.detach().numpy())
    payload = sum(len(buffer.getvalue()) for buffer in npy)
    for r_experts, r_both in zip(experts[1:], both[1:]):
        for c_experts, c_both in zip(r_experts["clients"], r_both["clients"]):
            assert c_both["uploaded_tensors"] - c_experts["uploaded_tensors"] == 2 * len(projections)
            assert c_both["bytes_up"] - c_experts["bytes_up"] == payload
    model, _, _ = load_classifier(tmp_path / "fedavg-r4-experts+attention" / "final-model")
    assert all("lora" not in name for name in model.model.state_dict())
    base.merge_lora()  # B = 0: the base model itself
    weights = dict(base.model.named_parameters())
    final = dict(model.model.named_parameters())
    assert all(not torch.equal(final[f"{name}.weight"], weights[f"{name}.weight"])
               for name in projections)
    assert torch.equal(model.model.backbone.get_input_embeddings().weight,
                       base.model.backbone.get_input_embeddings().weight)  # frozen, never sent
