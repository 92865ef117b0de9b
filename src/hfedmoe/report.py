"""Run outputs: ``config.toml``, ``metrics.jsonl``, ``summary.json`` and the plots.

A run directory holds::

    config.toml     the resolved RunConfig; `hfedmoe run --config <dir>/config.toml` repeats it
    inputs.json     fingerprints of the data and the model (hfedmoe.fingerprint)
    calibration.json  the budget calibration the run used (budget.calibration; absent if none)
    metrics.jsonl   one round record per line, appended (flush + fsync) as rounds complete
    summary.json    :func:`build_summary` of all records, written by :meth:`RunRecorder.finish`
    accuracy.png    test accuracy per round
    loss.png        test loss per round, and the mean train loss of the round when present
    experts.png     heatmap: in how many rounds each client trained each expert

The round record (produced by the federation code, one per evaluated round)::

    {"round": int,               # 0 = evaluation of the initial model, before any training
     "accuracy": float,          # test accuracy of the global model after this round
     "loss": float,              # test loss of the global model after this round
     "train_loss": float | None, # mean local train loss of the round; None for round 0
     "bytes_up": int,            # bytes sent clients -> server this round (all clients)
                                 # = bytes_up_activations (split learning's cut-layer
                                 # activations, else 0) + bytes_up_updates (model updates,
                                 # gradients or ZO scalars)
     "bytes_down": int,          # bytes sent server -> clients this round (all clients):
                                 # bytes_down_train + bytes_down_evaluate (ArrayRecord payloads)
     "round_seconds": float,     # wall time of this round
     "elapsed_seconds": float,   # wall time since the run started
     "clients": [                # one entry per client reply that was aggregated
        {"client_id": int, "num_examples": int, "train_loss": float,
         "budget_experts": int,                 # C_budget(c) the client trained under
         "max_active_experts_per_batch": int,   # max experts with gradient in one batch
         "peak_memory_bytes": int,              # measured: the allocator (one step on CPU)
         "peak_memory_estimate_bytes": int,     # tensor accounting, max over steps
         "mean_step_seconds": float,
         "bytes_up": int, "bytes_down": int}],
     "failures": [{"client_id": int, "reason": str}],   # replies lost or rejected
     # personalised evaluation (rounds >= 1 when data.client-test-fraction > 0; else None/absent):
     "personal_accuracy": float | None,          # unweighted mean of the per-client accuracies
     "personal_accuracy_weighted": float | None, # the same weighted by test examples
     "personal": [{"client_id": int, "num_examples": int, "accuracy": float, "loss": float}]}

Records may carry extra keys (method diagnostics); they are kept verbatim in metrics.jsonl
and ignored by the summary. Values must be JSON-serialisable; NumPy/torch scalars and
arrays are converted with ``.item()`` / ``.tolist()``. Non-finite floats are written as
``NaN`` / ``Infinity`` (Python's ``json`` reads them back).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from hfedmoe.config import RunConfig, Scalar
from hfedmoe.plots import is_finite_number, plot_accuracy, plot_expert_heatmap, plot_loss

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ACCURACY_PLOT = "accuracy.png"
LOSS_PLOT = "loss.png"
EXPERTS_PLOT = "experts.png"
INPUTS_FILE = "inputs.json"  # hfedmoe.fingerprint.input_fingerprints of the run
CALIBRATION_FILE = "calibration.json"  # the budget calibration a run used

RECORD_KEYS = ("round", "accuracy", "loss", "train_loss", "bytes_up", "bytes_down",
               "round_seconds", "elapsed_seconds", "clients", "failures")
CLIENT_KEYS = ("client_id", "num_examples", "train_loss", "budget_experts",
               "max_active_experts_per_batch", "peak_memory_bytes", "mean_step_seconds",
               "bytes_up", "bytes_down")
FAILURE_KEYS = ("client_id", "reason")


class RunRecorder:
    """Writes one run's outputs into ``out_dir``.

    Construction creates ``out_dir``, writes ``config.toml`` and starts ``metrics.jsonl``
    with ``records`` (those of a checkpoint when a run resumes; none for a new run): outputs
    already in the directory are replaced (a new run has first moved an earlier run aside to
    ``<out>.1``, hfedmoe.run_dir). Each :meth:`record_round` line is durable (fsync) when the
    call returns, so a crashed run keeps every completed round.
    """

    def __init__(self, out_dir: Path, config: RunConfig,
                 records: Sequence[Mapping[str, Any]] = (),
                 inputs: Mapping[str, str] | None = None,
                 calibration_json: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self._records: list[dict[str, Any]] = [dict(r) for r in records]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / SUMMARY_FILE).unlink(missing_ok=True)  # a summary marks a finished run
        _write_atomic(self.out_dir / CONFIG_FILE, config_to_toml(config))
        if inputs is not None:  # hfedmoe.fingerprint: what reuse and resume are keyed on
            _write_atomic(self.out_dir / INPUTS_FILE, json.dumps(dict(inputs), indent=2) + "\n")
        if calibration_json is not None:  # hfedmoe.calibration: how profiles became budgets
            _write_atomic(self.out_dir / CALIBRATION_FILE,
                          json.dumps(json.loads(calibration_json), indent=2) + "\n")
        _write_atomic(self.out_dir / METRICS_FILE, "".join(
            json.dumps(r, default=_json_default) + "\n" for r in self._records))

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records written so far (copies)."""
        return [json.loads(json.dumps(r, default=_json_default)) for r in self._records]

    def record_round(self, record: Mapping[str, Any]) -> None:
        """Validate ``record`` (see the module docstring) and append it to metrics.jsonl."""
        check_record(record)
        line = json.dumps(record, default=_json_default)
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())
        self._records.append(json.loads(line))  # exactly what is on disk, not an alias

    def finish(self, wall_seconds: float) -> dict[str, Any]:
        """Write summary.json and the plots; return the summary.

        Raises ValueError if no round was recorded.
        """
        summary = build_summary(self.config.method, self._records, wall_seconds,
                                task=self.config.task)
        text = json.dumps(summary, indent=2, default=_json_default) + "\n"
        _write_atomic(self.out_dir / SUMMARY_FILE, text)
        plot_accuracy(self._records, self.out_dir / ACCURACY_PLOT)
        plot_loss(self._records, self.out_dir / LOSS_PLOT)
        plot_expert_heatmap(self._records, self.out_dir / EXPERTS_PLOT)
        return summary


def check_record(record: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first missing key if ``record`` breaks the schema."""
    _require_keys(record, RECORD_KEYS, "round record")
    number = record["round"]
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        raise ValueError(f"round record: 'round' = {number!r} is not an integer >= 0")
    for client in record["clients"]:
        _require_keys(client, CLIENT_KEYS, f"round {number}: client entry")
    for failure in record["failures"]:
        _require_keys(failure, FAILURE_KEYS, f"round {number}: failure entry")


def _require_keys(entry: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{what} is a {type(entry).__name__}, not a mapping")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{what} lacks key(s) {', '.join(map(repr, missing))}")


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl`` in file order (blank lines skipped).

    Raises ValueError naming the line of a line that is not a JSON object.
    """
    path = Path(out_dir) / METRICS_FILE
    records: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


def build_summary(method: str, rounds: Sequence[Mapping[str, Any]],
                  wall_seconds: float, task: str = "classification") -> dict[str, Any]:
    """Summarise a run's round records (pure; records in any order, rounds distinct).

    ``rounds`` counts records with round >= 1, ``trained_rounds`` those that :func:`learned`,
    ``idle_replies`` the replies of clients that sat a round out. ``*_by_round`` lists are
    indexed by round number from 0 to the last round; a round without a record is ``None``.
    ``final_*`` come from the last round (``final_personal_accuracy``: its personalised
    accuracy, None if not evaluated); ``best_accuracy`` is the maximum over all evaluated rounds
    (round 0 included), ``best_round`` the earliest round reaching it. Byte totals sum all
    records. Per client (sorted by id): ``budget_experts`` and ``num_examples`` as reported
    in its latest round, maxima of active experts and peak memory, the number of records
    listing it, and the mean over those rounds of its mean step time. ``task`` is recorded;
    a causal-lm run adds ``final_perplexity``, ``final_exact_match``, ``final_rouge_l``,
    ``perplexity_by_round`` (``accuracy`` is then next-token accuracy on response tokens),
    ``final_personal_perplexity`` and ``personal_perplexity_by_round``
    (:func:`personal_perplexity`).
    """
    if not rounds:
        raise ValueError("no round records to summarise")
    for record in rounds:
        check_record(record)
    by_round = _index_by_round(rounds)
    last = max(by_round)
    accuracies = {r: rec["accuracy"] for r, rec in by_round.items()
                  if is_finite_number(rec["accuracy"])}
    best_round = max(sorted(accuracies), key=lambda r: accuracies[r]) if accuracies else None
    language = {} if task != "causal-lm" else {
        "final_perplexity": by_round[last].get("perplexity"),
        "final_exact_match": by_round[last].get("exact_match"),
        "final_rouge_l": by_round[last].get("rouge_l"),
        "perplexity_by_round": [by_round[r].get("perplexity") if r in by_round else None
                                for r in range(last + 1)],
        "final_personal_perplexity": personal_perplexity(by_round[last]),
        "personal_perplexity_by_round": [personal_perplexity(by_round[r]) if r in by_round
                                         else None for r in range(last + 1)],
    }
    return {
        "method": method,
        "task": task,
        **language,
        "rounds": sum(1 for r in by_round if r >= 1),
        "trained_rounds": sum(1 for r, rec in by_round.items() if r >= 1 and learned(rec)),
        "idle_replies": sum(1 for rec in by_round.values() for client in rec["clients"]
                            if client.get("local_steps", 1) == 0),
        "final_accuracy": by_round[last]["accuracy"],
        "final_loss": by_round[last]["loss"],
        "best_accuracy": accuracies[best_round] if best_round is not None else None,
        "best_round": best_round,
        "final_personal_accuracy": by_round[last].get("personal_accuracy"),
        "accuracy_by_round": _by_round(by_round, last, "accuracy"),
        "personal_accuracy_by_round": [by_round[r].get("personal_accuracy") if r in by_round
                                       else None for r in range(last + 1)],
        "loss_by_round": _by_round(by_round, last, "loss"),
        "train_loss_by_round": _by_round(by_round, last, "train_loss"),
        "round_seconds_by_round": _by_round(by_round, last, "round_seconds"),
        "bytes_up": sum(rec["bytes_up"] for rec in by_round.values()),
        # split learning: activations vs model-update traffic (other methods: updates only)
        "bytes_up_activations": sum(rec.get("bytes_up_activations", 0)
                                    for rec in by_round.values()),
        "bytes_up_updates": sum(rec.get("bytes_up_updates", rec["bytes_up"])
                                for rec in by_round.values()),
        "bytes_down": sum(rec["bytes_down"] for rec in by_round.values()),
        "wall_seconds": float(wall_seconds),
        "failures": [{"round": r, "client_id": f["client_id"], "reason": f["reason"]}
                     for r, rec in sorted(by_round.items()) for f in rec["failures"]],
        "clients": summarise_clients(by_round),
    }


def personal_perplexity(record: Mapping[str, Any]) -> float | None:
    """The personalised perplexity of a causal-lm round: the unweighted mean over the clients
    that evaluated of exp(mean loss per response token on their own test split), as
    ``personal_accuracy`` averages their accuracies; None when no client evaluated."""
    losses = [e["loss"] for e in record.get("personal") or () if is_finite_number(e["loss"])]
    if not losses:
        return None
    return sum(math.exp(min(loss, 700.0)) for loss in losses) / len(losses)


def learned(record: Mapping[str, Any]) -> bool:
    """Whether a round changed the model from training: it aggregated (``aggregated`` is not
    False) at least one reply of a client that took a local step (``local_steps`` > 0)."""
    return record.get("aggregated", True) is not False and any(
        client.get("local_steps", 1) > 0 for client in record["clients"])


def nothing_learned_reason(summary: Mapping[str, Any]) -> str | None:
    """One line saying why a run changed nothing (no round in ``trained_rounds``), or None."""
    if summary.get("trained_rounds", 1) > 0:
        return None
    kinds: dict[str, int] = {}
    for failure in summary["failures"]:
        kind = failure["reason"].split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    lost = ", ".join(f"{n} x {kind}" for kind, n in sorted(kinds.items())) or "none"
    return (f"no round of {summary['rounds']} aggregated an update of a client that trained, so "
            f"the model never changed ({summary.get('idle_replies', 0)} replies of clients that "
            f"sat the round out; replies lost: {lost}); see metrics.jsonl")


def summarise_clients(by_round: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-client totals over ``{round: record}``, sorted by client id (see build_summary)."""
    entries: dict[int, list[Mapping[str, Any]]] = {}
    for number in sorted(by_round):
        seen: set[int] = set()
        for client in by_round[number]["clients"]:
            client_id = client["client_id"]
            if client_id in seen:
                raise ValueError(f"round {number}: client {client_id} is listed twice")
            seen.add(client_id)
            entries.setdefault(client_id, []).append(client)
    return [_client_summary(client_id, entries[client_id]) for client_id in sorted(entries)]


def _client_summary(client_id: int, rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    latest = rounds[-1]
    return {
        "client_id": client_id,
        "budget_experts": latest["budget_experts"],
        "max_active_experts_per_batch": max(c["max_active_experts_per_batch"] for c in rounds),
        # False marks a method that ignored the client's budget (e.g. fedavg-full)
        "within_budget": all(c["max_active_experts_per_batch"] <= c["budget_experts"]
                             for c in rounds),
        "peak_memory_bytes": max(c["peak_memory_bytes"] for c in rounds),
        "num_examples": latest["num_examples"],
        "rounds_participated": len(rounds),
        "mean_step_seconds": sum(c["mean_step_seconds"] for c in rounds) / len(rounds),
    }


def _index_by_round(rounds: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    by_round: dict[int, Mapping[str, Any]] = {}
    for record in rounds:
        if record["round"] in by_round:
            raise ValueError(f"round {record['round']} is recorded twice")
        by_round[record["round"]] = record
    return by_round


def _by_round(by_round: Mapping[int, Mapping[str, Any]], last: int, key: str) -> list[Any]:
    return [by_round[r][key] if r in by_round else None for r in range(last + 1)]




# ---- config.toml ------------------------------------------------------------------------

def config_to_toml(config: RunConfig) -> str:
    """``config`` as TOML that :func:`hfedmoe.config.load_config_file` reads back equal."""
    return "# Resolved configuration of this run.\n" + flat_to_toml(config.to_flat())


def flat_to_toml(flat: Mapping[str, Scalar]) -> str:
    """Flat dotted keys (``"model.top-k"``) as TOML tables; inverse of flattening.

    Raises ValueError if a key is both a value and a table, TypeError for a non-scalar.
    """
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        table = tree
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ValueError(f"config key '{dotted}': '{part}' is both a value and a table")
        if leaf in table:
            raise ValueError(f"config key '{dotted}' is both a value and a table")
        table[leaf] = value
    return "\n".join(_toml_table_lines(tree, ())) + "\n"


def _toml_table_lines(table: Mapping[str, Any], path: tuple[str, ...]) -> list[str]:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    lines = [f"[{'.'.join(map(_toml_key, path))}]"] if path and scalars else []
    lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in scalars.items()]
    for key, value in table.items():
        if isinstance(value, dict):
            lines += ([""] if lines else []) + _toml_table_lines(value, (*path, key))
    return lines


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # always has '.', 'e': a TOML float, round-trips exactly
    if isinstance(value, str):
        return _toml_string(value)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML scalar")


_TOML_ESCAPES = MappingProxyType({'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t",
                                  "\n": "\\n", "\f": "\\f", "\r": "\\r"})


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    parts = []
    for char in text:
        if char in _TOML_ESCAPES:
            parts.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            parts.append(f"\\u{ord(char):04X}")
        else:
            parts.append(char)
    return '"' + "".join(parts) + '"'


# ---- files ------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new file, never half."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _json_default(value: Any) -> Any:
    """JSON fallback for NumPy/torch scalars and arrays; anything else is an error."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"round record value of type {type(value).__name__} is not JSON-serialisable")
