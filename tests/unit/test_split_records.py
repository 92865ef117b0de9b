"""The split-learning messages (records: split learning): what a client sends decodes back,
and each malformed reply is refused with a message naming the problem."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from hfedmoe.federation import records

H, T, B, P = 6, 5, 2, 3


def _metrics(batch: int = B) -> MetricRecord:
    return records.split_metrics(client_id=1, num_examples=40, batch_examples=batch,
                                 peak_memory_bytes=100, seconds=0.5)


def _activations(**changes):
    arrays = {"z": torch.randn(B, T, H), "attention_mask": torch.ones(B, T),
              "labels": torch.tensor([0, 2]), "perturbed": [torch.randn(B, T, H)] * P}
    arrays.update(changes)
    return records.activations_reply(arrays["z"], arrays["attention_mask"], arrays["labels"],
                                     changes.pop("metrics", _metrics()), arrays["perturbed"])


def _parse(content, phase="perturbed"):
    return records.parse_split_reply(content, phase, hidden_size=H, max_length=T, directions=P)


def test_instruction_and_replies_round_trip():
    lam = torch.randn(B, T, H)
    instruction = records.parse_split_instruction(records.split_instruction(
        4, {"seed": 0}, "zo", cut_gradient=lam, seeds=[5, 6, 7]))
    assert (instruction.server_round, instruction.phase, instruction.seeds) == (4, "zo", (5, 6, 7))
    assert torch.equal(instruction.cut_gradient, lam) and instruction.client_part is None
    content = _activations()
    reply = _parse(content)
    assert reply.client_id == 1 and reply.num_examples == 40 and len(reply.perturbed) == P
    # what travels: the float32 payload (and each array's small header)
    assert reply.bytes_up == records.record_bytes(content.array_records[records.ACTIVATIONS])
    payload = sum(4 * x for x in (B * T * H * (P + 1), B * T, B))
    assert payload < reply.bytes_up < payload + 6 * 256
    scalars = _parse(records.scalars_reply([0.1, -0.2, 0.3], _metrics()), "zo")
    assert scalars.scalars == (0.1, -0.2, 0.3) and scalars.bytes_up == P * 8


@pytest.mark.parametrize("content, match", [
    (lambda: _activations(z=torch.randn(B, T, H + 1)), "z has shape"),
    (lambda: _activations(z=torch.randn(B, T + 1, H)), "z has shape"),
    (lambda: _activations(attention_mask=torch.full((B, T), 2.0)), "attention-mask"),
    (lambda: _activations(labels=torch.tensor([0.5, 1.0])), "not integers"),
    (lambda: _activations(labels=torch.tensor([0])), "labels have shape"),
    (lambda: _activations(perturbed=[torch.randn(B, T, H)]), "perturbed activations"),
    (lambda: _activations(perturbed=[torch.full((B, T, H), math.inf)] * P), "not finite"),
    (lambda: _activations(metrics=_metrics(batch=B + 1)), "batch-examples"),
])
def test_malformed_activations_are_refused(content, match):
    with pytest.raises(ValueError, match=match):
        _parse(content())


def test_wrong_scalars_are_refused():
    with pytest.raises(ValueError, match="scalars"):
        _parse(records.scalars_reply([0.1, 0.2], _metrics()), "zo")
    with pytest.raises(ValueError, match="scalars"):
        _parse(records.scalars_reply([0.1, math.nan, 0.2], _metrics()), "zo")
    with pytest.raises(ValueError, match="metrics"):
        _parse(RecordDict({}), "zo")


def test_a_second_exchange_without_the_first_is_refused_on_the_node():
    state = RecordDict({})
    with pytest.raises(ValueError, match="no client part of round 3"):
        records.split_state(state, 3)
    records.store_split_state(state, 2, records.to_array_record({"a": torch.ones(2)}))
    with pytest.raises(ValueError, match="round 3"):
        records.split_state(state, 3)
    assert torch.equal(records.split_state(state, 2)["a"], torch.ones(2))
