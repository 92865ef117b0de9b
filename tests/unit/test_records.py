"""Message schema: replies round-trip; bad updates are rejected before aggregation."""

import pytest
import torch

from hfedmoe.federation import records
from hfedmoe.training import LocalTrainingResult

from test_personal_eval import _Display, _Sink  # a RoundBook's record sink and display


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


def test_the_client_process_memory_travels_to_the_round_record():
    from hfedmoe.federation.rounds import client_entry
    from hfedmoe.measurement import ProcessMemory

    memory = ProcessMemory(resident_bytes=3 * 2**30 + 5, peak_resident_bytes=4 * 2**30 + 7)
    update = records.parse_train_reply(records.train_reply(4, 1, {}, _result(), memory), (1, 2))
    entry = client_entry(update, 0, 0)
    assert entry["process_resident_bytes"] == 3 * 2**30 + 5
    assert entry["process_peak_resident_bytes"] == 4 * 2**30 + 7
    assert isinstance(entry["process_resident_bytes"], int)
    # a reply without them (an older client) is still valid, and its entry has none
    bare = client_entry(records.parse_train_reply(records.train_reply(4, 1, {}, _result()),
                                                  (1, 2)), 0, 0)
    assert "process_resident_bytes" not in bare


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


def test_a_retried_round_counts_the_bytes_of_every_attempt():
    """Attempt 1 (too few replies) still spent its traffic: the round record adds it to the
    last attempt's, and keeps the earlier attempt's failures."""
    from hfedmoe.federation.rounds import RoundBook
    sink = _Sink()
    book = RoundBook(sink, _Display())
    book.round_started(1, 3)
    book.train_finished(1, [], [{"client_id": 2, "kind": "raised"}], {0: (100, 1000)}, 3000,
                        aggregated=False)
    book.round_started(1, 3)  # the retry
    book.train_finished(1, [], [], {0: (70, 1000), 1: (50, 1000)}, 3000)
    book.evaluated(1, 0.5, 1.0)
    record = sink.records[-1]
    assert (record["bytes_up"], record["bytes_down"]) == (100 + 70 + 50, 2 * 3000)
    assert record["attempts"] == 2 and record["earlier_failures"][0]["client_id"] == 2
    assert len(record["clients"]) == 0 and record["failures"] == []
    book.round_started(2, 3)  # a new round starts from zero
    book.train_finished(2, [], [], {0: (10, 1000)}, 3000)
    book.clients_evaluated(2, [], bytes_down=2 * 1000)  # two nodes asked to evaluate
    book.evaluated(2, 0.5, 1.0)
    record = sink.records[-1]
    assert (record["bytes_up"], record["bytes_down"]) == (10, 3000 + 2000)
    assert (record["bytes_down_train"], record["bytes_down_evaluate"]) == (3000, 2000)
    book.round_started(3, 3)
    book.train_finished(3, [], [{"client_id": 1, "kind": "raised"}], {}, 3000, aggregated=False)
    book.round_started(3, 3)
    book.train_finished(3, [], [{"client_id": 0, "kind": "raised"}], {}, 3000, aggregated=False)
    book.round_started(3, 3)
    book.train_finished(3, [], [], {0: (7, 1000)}, 3000)
    book.evaluated(3, 0.5, 1.0)
    record = sink.records[-1]
    assert record["attempts"] == 3
    assert (record["bytes_up"], record["bytes_down"]) == (7, 3 * 3000)
    assert [f["client_id"] for f in record["earlier_failures"]] == [1, 0]
