"""Personalised evaluation bookkeeping: the evaluate reply codec, the per-round summary, the
node's personal state, summary.json and the comparison table."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from hfedmoe.compare import comparison_table, summarise_method
from hfedmoe.federation import records
from hfedmoe.federation.rounds import RoundBook, personal_entries, personal_summary
from hfedmoe.report import build_summary


def test_evaluate_reply_round_trips():
    parsed = records.parse_evaluate_reply(records.evaluate_reply(2, 40, 0.75, 0.5))
    assert parsed == records.ClientAccuracy(2, 40, 0.75, 0.5)


@pytest.mark.parametrize("metrics, fragment", [
    ({"client-id": 1, "num-examples": 3, "accuracy": 0.5}, "lacks loss"),
    ({"client-id": 1, "num-examples": -3, "accuracy": 0.5, "loss": 1.0}, "num-examples"),
    ({"client-id": 1, "num-examples": 3, "accuracy": 1.5, "loss": 1.0}, "outside [0, 1]"),
    ({"client-id": 1, "num-examples": 3, "accuracy": 0.5, "loss": math.nan}, "not finite"),
])
def test_malformed_evaluate_replies_are_refused(metrics, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        records.parse_evaluate_reply(RecordDict({records.EVALUATION: MetricRecord(metrics)}))
    with pytest.raises(ValueError, match="lacks the 'evaluation' record"):
        records.parse_evaluate_reply(RecordDict())


def test_personal_summary_is_the_unweighted_and_weighted_mean():
    results = [records.ClientAccuracy(2, 30, 0.9, 0.2), records.ClientAccuracy(0, 10, 0.5, 0.6),
               records.ClientAccuracy(1, 0, 0.0, 0.0),  # nothing to evaluate: left out
               records.ClientAccuracy(0, 99, 0.1, 0.1)]  # a second reply of client 0: ignored
    entries = personal_entries(results)
    assert [e["client_id"] for e in entries] == [0, 2]
    summary = personal_summary(entries)
    assert summary["personal_accuracy"] == pytest.approx((0.5 + 0.9) / 2)
    assert summary["personal_accuracy_weighted"] == pytest.approx((5 + 27) / 40)
    assert summary["personal_loss"] == pytest.approx(0.4)
    assert personal_summary([])["personal_accuracy"] is None


class _Sink:
    def __init__(self):
        self.records = []

    def record_round(self, record):
        self.records.append(record)


class _Display:
    def round_started(self, server_round, num_sampled=None):
        pass

    def round_finished(self, record):
        pass


def test_round_record_carries_the_personal_view():
    sink = _Sink()
    book = RoundBook(sink, _Display())
    book.evaluated(0, 0.2, 1.0)
    book.round_started(1, 2)
    book.clients_evaluated(1, [records.ClientAccuracy(0, 10, 0.4, 1.0),
                               records.ClientAccuracy(1, 30, 0.8, 1.0)], failures=1)
    book.evaluated(1, 0.3, 0.9)
    round0, round1 = sink.records
    assert round0["personal_accuracy"] is None
    assert round1["personal_accuracy"] == pytest.approx(0.6)
    assert round1["personal_failures"] == 1 and len(round1["personal"]) == 2


def _record(number, accuracy, personal):
    return {"round": number, "accuracy": accuracy, "loss": 1.0, "train_loss": None,
            "bytes_up": 0, "bytes_down": 0, "round_seconds": 0.0, "elapsed_seconds": 0.0,
            "clients": [], "failures": [], "personal_accuracy": personal}


def test_summary_and_comparison_report_personal_accuracy():
    summary = build_summary("flex", [_record(0, 0.2, None), _record(1, 0.3, 0.6),
                                     _record(2, 0.4, 0.7)], 1.0)
    assert summary["final_personal_accuracy"] == 0.7
    assert summary["personal_accuracy_by_round"] == [None, 0.6, 0.7]
    old = {**summary}
    del old["final_personal_accuracy"]  # a summary written before personalised evaluation
    stats = summarise_method([summary, old], target=0.35)
    assert stats["final_personal_accuracy"]["values"] == [0.7, None]
    table = comparison_table({"target_accuracy": 0.35, "seeds": [0, 1],
                              "methods": {"flex": stats}})
    assert "personal acc" in table.splitlines()[2]
    assert "| flex | 0.400 ± 0.000 | 0.700 ± 0.000 |" in table


def test_personal_state_is_stored_in_and_read_back_from_the_node_state():
    state = RecordDict()
    assert records.personal_state(state) == {}
    records.store_personal_state(state, {"expert.0.1.w": torch.arange(3.0)})
    assert torch.equal(records.personal_state(state)["expert.0.1.w"], torch.arange(3.0))
    records.store_personal_state(state, {})
    assert records.personal_state(state) == {}


def test_the_progress_line_shows_the_personal_accuracy_when_there_is_one():
    from hfedmoe.progress import format_round_line

    assert "personal accuracy 0.6000" in format_round_line(_record(1, 0.3, 0.6), 2)
    assert "personal" not in format_round_line(_record(0, 0.3, None), 2)


def test_a_causal_lm_comparison_reports_perplexity_exact_match_and_rouge_l():
    """Causal-LM summaries carry their generation metrics into comparison.json (mean ± std
    over seeds) and comparison.md shows them; classification comparisons do not get them."""
    def lm_record(number, perplexity, exact, rouge):
        return {**_record(number, 0.5, None), "perplexity": perplexity,
                "exact_match": exact, "rouge_l": rouge}

    seeds = [build_summary("hfedmoe", [lm_record(0, 200.0, 0.0, 0.1),
                                       lm_record(1, final, exact, 0.25)], 1.0, "causal-lm")
             for final, exact in ((30.0, 0.125), (40.0, 0.375))]
    stats = summarise_method(seeds, target=0.9)
    assert stats["final_perplexity"] == {"mean": 35.0, "std": pytest.approx(7.0710678),
                                         "values": [30.0, 40.0]}
    assert stats["final_exact_match"]["mean"] == 0.25
    assert stats["final_rouge_l"]["values"] == [0.25, 0.25]
    table = comparison_table({"target_accuracy": 0.9, "seeds": [0, 1],
                              "methods": {"hfedmoe": stats}}).splitlines()
    assert "| method | perplexity | personal perplexity | exact match | ROUGE-L" in table[2]
    assert table[4].startswith("| hfedmoe | 35.00 ± 7.07 | n/a | 0.250 ± 0.177 | 0.250 ± 0.000 "
                               "| 0.500 ± 0.000 |")
    classification = summarise_method([build_summary("flex", [_record(0, 0.2, None),
                                                              _record(1, 0.3, 0.6)], 1.0)], 0.9)
    assert "final_perplexity" not in classification
