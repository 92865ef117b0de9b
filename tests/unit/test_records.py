"""Message schema: replies round-trip; bad updates are rejected before aggregation."""

import pytest
import torch

from hfedmoe.federation import records
from hfedmoe.training import LocalTrainingResult


def _result():
    return LocalTrainingResult(
        num_examples=7, train_loss=0.5, trained_experts=torch.tensor([[True, False]]),
        usage=torch.tensor([[0.75, 0.25]]), importance=torch.tensor([[0.6, 0.1]]),
        max_active_experts_per_batch=1, peak_memory_bytes=123, mean_step_seconds=0.01)


def test_reply_round_trips():
    upload = {"expert.0.0.w": torch.arange(6.0).reshape(2, 3)}
    content = records.train_reply(4, 1, upload, _result())
    update = records.parse_train_reply(content, (1, 2))
    assert update.client_id == 4 and update.num_examples == 7
    assert torch.equal(update.state["expert.0.0.w"], upload["expert.0.0.w"])
    assert torch.equal(update.usage, torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(update.importance, torch.tensor([[0.6, 0.1]]))
    assert torch.equal(update.trained, torch.tensor([[True, False]]))
    assert update.metrics["budget-experts"] == 1


def test_reply_with_wrong_usage_shape_is_rejected():
    content = records.train_reply(0, 1, {}, _result())
    with pytest.raises(ValueError, match="usage"):
        records.parse_train_reply(content, (2, 2))


@pytest.mark.parametrize("update, message", [
    ({"expert.9.9.w": torch.zeros(2)}, "unknown tensor"),
    ({"expert.0.0.w": torch.zeros(3)}, "shape"),
    ({"expert.0.0.w": torch.tensor([1.0, float("nan")])}, "non-finite"),
    ({"expert.0.0.w": torch.tensor([float("inf"), 0.0])}, "non-finite"),
])
def test_bad_updates_are_rejected(update, message):
    with pytest.raises(ValueError, match=message):
        records.check_update(update, {"expert.0.0.w": torch.zeros(2)})
    records.check_update({"expert.0.0.w": torch.ones(2)}, {"expert.0.0.w": torch.zeros(2)})
