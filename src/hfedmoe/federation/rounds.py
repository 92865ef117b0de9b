"""Per-round bookkeeping on the server: joins training replies and evaluation into one record.

The strategy reports a round's training (``train_finished``) and its personalised evaluation
(``clients_evaluated``); the centralised evaluation then completes it (``evaluated``), and the
record goes to metrics.jsonl and the display.
Round 0 is the evaluation of the initial model.
"""

from __future__ import annotations

import time
from typing import Mapping, Protocol, Sequence

import torch

from hfedmoe.aggregation import ClientUpdate
from hfedmoe.federation.records import OPTIONAL_REPLY_METRIC_KEYS, ClientAccuracy
from hfedmoe.measurement import process_cpu_seconds, process_memory


class RecordSink(Protocol):
    def record_round(self, record: dict) -> None: ...


class Display(Protocol):
    def round_started(self, server_round: int, num_sampled: int | None = None) -> None: ...
    def client_finished(self, round: int, client_id: int, info: Mapping) -> None: ...
    def round_finished(self, record: dict) -> None: ...


def client_entry(update: ClientUpdate, bytes_up: int, bytes_down: int,
                 diagnostics: Mapping | None = None) -> dict:
    """One client's part of a round record; ``diagnostics``: the method's, for this client."""
    m = update.metrics
    trained = update.trained if update.trained is not None else torch.zeros_like(update.usage)
    return {
        **(diagnostics or {}),
        "active_experts_per_layer": [int(n) for n in trained.sum(dim=1)],
        "trained_experts": [int(t) for t in trained.reshape(-1)],
        "usage": [round(float(u), 6) for u in update.usage.reshape(-1)],
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "client_id": update.client_id,
        "num_examples": update.num_examples,
        "train_loss": m["train-loss"],
        "budget_experts": int(m["budget-experts"]),
        "max_active_experts_per_batch": int(m["max-active-experts-per-batch"]),
        "peak_memory_bytes": int(m["peak-memory-bytes"]),
        "peak_memory_estimate_bytes": int(m["peak-memory-estimate-bytes"]),
        "mean_step_seconds": m["mean-step-seconds"],
        "uploaded_tensors": int(m.get("uploaded-tensors", len(update.state))),
        "local_steps": int(m["local-steps"]),
        # one-pass selection vs the exact Eq. 15 set (round means; absent otherwise), a
        # method's routing regulariser (fedalign: round mean of its term), and the client
        # process's resident and peak memory after the round (bytes)
        **{key.replace("-", "_"): int(m[key]) if key.endswith("-bytes") else m[key]
           for key in OPTIONAL_REPLY_METRIC_KEYS if key in m},
    }


def personal_entries(results: Sequence[ClientAccuracy]) -> list[dict]:
    """One entry per client that evaluated at least one example, sorted by client id (a
    client reported twice counts once, its first reply)."""
    entries: dict[int, dict] = {}
    for r in results:
        if r.num_examples > 0 and r.client_id not in entries:
            entries[r.client_id] = {"client_id": r.client_id, "num_examples": r.num_examples,
                                    "accuracy": r.accuracy, "loss": r.loss}
    return [entries[cid] for cid in sorted(entries)]


def personal_summary(entries: Sequence[Mapping]) -> dict:
    """``personal_accuracy``: the unweighted mean over clients of their own-test-split
    accuracy; ``personal_accuracy_weighted``: weighted by test examples (= pooled accuracy);
    ``personal_loss``: the unweighted mean loss. None when no client evaluated."""
    if not entries:
        return {"personal_accuracy": None, "personal_accuracy_weighted": None,
                "personal_loss": None}
    examples = sum(e["num_examples"] for e in entries)
    return {
        "personal_accuracy": sum(e["accuracy"] for e in entries) / len(entries),
        "personal_accuracy_weighted": sum(e["accuracy"] * e["num_examples"]
                                          for e in entries) / examples,
        "personal_loss": sum(e["loss"] for e in entries) / len(entries),
    }


class RoundBook:
    def __init__(self, sink: RecordSink, display: Display) -> None:
        self._sink, self._display = sink, display
        self._started = time.perf_counter()
        self._round_start = self._started
        self._pending: dict = {}
        self._pending_round = -1

    def resume_after(self, elapsed_seconds: float) -> None:
        """Continue a resumed run's clock: ``elapsed_seconds`` were spent before."""
        self._started = time.perf_counter() - elapsed_seconds

    def round_started(self, server_round: int, num_sampled: int) -> None:
        """A round (or a retry of it: same ``server_round`` again) was sent out."""
        if server_round == self._pending_round:
            # a retry keeps the earlier attempts' failures, and their bytes: what was sent and
            # uploaded in a failed attempt travelled all the same
            done = self._pending
            self._pending = {
                "sampled": num_sampled, "attempts": done["attempts"] + 1,
                "earlier_failures": done.get("earlier_failures", []) + done.get("failures", []),
                # bytes_* of the attempt just done already include the attempts before it
                "earlier_bytes_up": done.get("bytes_up", done.get("earlier_bytes_up", 0)),
                "earlier_bytes_down": done.get("bytes_down", done.get("earlier_bytes_down", 0)),
                "earlier_bytes_up_activations": done.get(
                    "bytes_up_activations", done.get("earlier_bytes_up_activations", 0)),
            }
            return
        self._round_start = time.perf_counter()
        self._display.round_started(server_round, num_sampled)
        self._pending_round = server_round
        self._pending = {"sampled": num_sampled, "attempts": 1, "earlier_failures": []}

    def client_finished(self, server_round: int, client_id: int, info: Mapping) -> None:
        """Show one client's training reply (``info``: reply-metric or record-entry keys)."""
        self._display.client_finished(server_round, client_id, info)

    def train_finished(self, server_round: int, updates: Sequence[ClientUpdate],
                       failures: list[dict], traffic: Mapping[int, tuple[int, int]],
                       bytes_down: int, diagnostics: Mapping | None = None,
                       aggregated: bool = True) -> None:
        """``traffic``: client id -> (bytes uploaded, bytes sent to it); ``bytes_down`` also
        counts clients that failed (what was sent to them was spent). ``aggregated``: False
        when too few valid replies arrived (federation.min-replies) and the global model was
        left unchanged by this attempt."""
        diagnostics = diagnostics or {}
        per_client = diagnostics.get("clients", {})
        trained = [u for u in updates if u.metrics["local-steps"] > 0]
        weights = sum(u.num_examples for u in trained)
        train_loss = (sum(u.metrics["train-loss"] * u.num_examples for u in trained) / weights
                      if weights else None)
        bytes_up = sum(up for up, _ in traffic.values()) + self._pending.get("earlier_bytes_up", 0)
        # split learning reports its activations apart (its diagnostics); every other method
        # uploads model updates only
        activations = diagnostics.get("bytes_up_activations", 0) + self._pending.get(
            "earlier_bytes_up_activations", 0)
        self._pending.update({
            "train_loss": train_loss,
            # every attempt of the round (retries included); clients[*] are the last attempt's
            "bytes_up": bytes_up,
            "bytes_up_activations": activations,
            "bytes_up_updates": bytes_up - activations,
            "bytes_down": bytes_down + self._pending.get("earlier_bytes_down", 0),
            "bytes_down_train": bytes_down + self._pending.get("earlier_bytes_down", 0),
            "clients": sorted((client_entry(u, *traffic[u.client_id],
                                            per_client.get(u.client_id))
                               for u in updates), key=lambda c: c["client_id"]),
            **{k: v for k, v in diagnostics.items()
               if k not in ("clients", "bytes_up_activations", "bytes_up_updates")},
            "failures": failures,
            "aggregated": aggregated,
            # seconds from the round's start (first attempt) until its training replies were
            # in or timed out; round_seconds - replies_seconds is what the server did after
            "replies_seconds": time.perf_counter() - self._round_start,
        })

    def clients_evaluated(self, server_round: int, results: Sequence[ClientAccuracy],
                          failures: int = 0, bytes_down: int = 0) -> dict:
        """The round's personalised evaluation (each client on its own test split): adds
        ``personal`` (per client), :func:`personal_summary` and ``personal_failures`` to the
        round record, and ``bytes_down`` (the evaluation instructions' arrays, every node
        asked) to its ``bytes_down`` and ``bytes_down_evaluate``; returns the summary."""
        entries = personal_entries(results)
        summary = personal_summary(entries)
        self._pending.update({**summary, "personal": entries, "personal_failures": failures,
                              "bytes_down_evaluate": bytes_down,
                              "bytes_down": self._pending.get("bytes_down", 0) + bytes_down})
        return summary

    def evaluated(self, server_round: int, accuracy: float, loss: float,
                  metrics: Mapping[str, float] | None = None) -> dict:
        """Close the round's record with the global model's evaluation (``metrics``: the
        task's extras, e.g. causal-lm's perplexity, exact_match, rouge_l) and write it."""
        now = time.perf_counter()
        server = process_memory()  # the server's process (in-process: the clients' too)
        record = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            **dict(metrics or {}),
            "train_loss": None,
            "bytes_up": 0,
            "bytes_up_activations": 0,
            "bytes_up_updates": 0,
            "bytes_down": 0,
            "bytes_down_train": 0,
            "bytes_down_evaluate": 0,
            "clients": [],
            "failures": [],
            "personal_accuracy": None,
            **(self._pending if server_round > 0 else {}),
            "round_seconds": now - self._round_start if server_round > 0 else 0.0,
            "elapsed_seconds": now - self._started,
            "server_resident_bytes": server.resident_bytes,
            "server_peak_resident_bytes": server.peak_resident_bytes,
            "server_cpu_seconds": process_cpu_seconds(),  # cumulative, every thread
        }
        self._pending = {}
        self._sink.record_round(record)
        self._display.round_finished(record)
        return record
