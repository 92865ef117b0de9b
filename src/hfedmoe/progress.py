"""Live progress of a federated run: one line per round start, client reply and round end.

On a terminal the lines are styled with rich; on any other stream (a file, a pipe, CI,
pytest's capture) they are plain text, one event per line, so that logs stay greppable.
Output is best effort: a failing stream (closed, broken pipe, encoding) disables the display
for the rest of the run and never raises into the federation.
"""

from __future__ import annotations

import math
import numbers
import sys
from types import TracebackType
from typing import Any, Mapping, TextIO

from rich.console import Console
from rich.text import Text


class ProgressDisplay:
    """Prints run progress to ``stream`` (default: ``sys.stdout`` at construction)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._console = Console(file=self._stream, highlight=False, soft_wrap=True) \
            if _is_terminal(self._stream) else None
        self._num_rounds = 0
        self._num_clients = 0
        self._sampled = 0  # clients sent this round's instruction
        self._replies = 0
        self._enabled = True

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def start(self, num_rounds: int, num_clients: int, sampled: int | None = None,
              name: str = "") -> None:
        """Announce a run of ``num_rounds`` training rounds over ``num_clients`` clients, of
        which ``sampled`` (default: all) are sampled each round (train.fraction-train);
        ``name`` (e.g. ``"hfedmoe, seed 0"``) tells the runs of a comparison apart."""
        self._num_rounds, self._num_clients = num_rounds, num_clients
        sampled = num_clients if sampled is None else sampled
        who = (f"{plural(num_clients, 'client')} per round" if sampled >= num_clients
               else f"{sampled} of {plural(num_clients, 'client')} sampled per round")
        self._emit(f"hfedmoe: {name + ': ' if name else ''}{plural(num_rounds, 'round')}, {who}",
                   "bold")

    def round_started(self, round: int, num_sampled: int | None = None) -> None:
        """A training round begins, sent to ``num_sampled`` clients (default: the number given
        to :meth:`start`); resets the reply counter, whose denominator it becomes."""
        self._replies = 0
        self._sampled = self._num_clients if num_sampled is None else num_sampled
        extra = (f" ({self._sampled} of {self._num_clients} clients)"
                 if self._sampled < self._num_clients else "")
        self._emit(f"round {round}/{self._num_rounds} started{extra}", "rule")

    def client_finished(self, round: int, client_id: int, info: Mapping[str, Any]) -> None:
        """One client's reply arrived.

        ``info`` holds keys of a round record's client entry (``num_examples``, ...); the
        hyphenated reply-metric names (``num-examples``) are accepted too. An ``error`` key
        marks a failed reply. Missing values print as ``?``.
        """
        self._replies += 1
        info = {str(key).replace("-", "_"): value for key, value in info.items()}
        if info.get("error") is not None:
            line = f"  round {round} client {client_id} [{self._replies}/{self._sampled}]: " \
                   f"failed: {info['error']}"
            self._emit(line, "bold red")
            return
        self._emit(format_client_line(round, client_id, info, self._replies, self._sampled),
                   "dim")

    def round_finished(self, record: Mapping[str, Any]) -> None:
        """A round (or round 0, the initial evaluation) was evaluated; ``record`` as in report."""
        self._emit(format_round_line(record, self._num_rounds), "bold green")
        for failure in record.get("failures") or ():
            self._emit(f"  failure: client {failure.get('client_id', '?')}: "
                       f"{failure.get('reason', '?')}", "bold red")

    def close(self) -> None:
        """Flush the stream; further calls print nothing. Idempotent."""
        if self._enabled:
            try:
                self._stream.flush()
            except Exception:  # noqa: BLE001 - the terminal must never fail the run
                pass
        self._enabled = False

    def _emit(self, line: str, style: str) -> None:
        if not self._enabled:
            return
        try:
            if self._console is None:
                self._stream.write(line + "\n")
                self._stream.flush()
            elif style == "rule":
                self._console.rule(Text(line), style="cyan")
            else:
                self._console.print(line, style=style, markup=False)
        except Exception:  # noqa: BLE001 - the terminal must never fail the run
            self._enabled = False


def format_client_line(round: int, client_id: int, info: Mapping[str, Any],
                       reply: int, expected: int) -> str:
    """``  round 2 client 3 [1/8]: 120 examples, train loss 0.6931, active experts 4/6, ...``"""
    return (f"  round {round} client {client_id} [{reply}/{expected}]: "
            f"{_number(info.get('num_examples'), 'd')} examples, "
            f"train loss {_number(info.get('train_loss'), '.4f')}, "
            f"active experts {_number(info.get('max_active_experts_per_batch'), 'd')}"
            f"/{_number(info.get('budget_experts'), 'd')}, "
            f"step {_number(info.get('mean_step_seconds'), '.3f')} s")


def format_round_line(record: Mapping[str, Any], num_rounds: int) -> str:
    """``round 2/5 done: accuracy 0.8125, loss 0.5012, train loss ..., up ..., 12.3 s``"""
    number = record.get("round", "?")
    head = "round 0 (initial model)" if number == 0 else f"round {number}/{num_rounds} done"
    parts = [f"accuracy {_number(record.get('accuracy'), '.4f')}",
             f"loss {_number(record.get('loss'), '.4f')}"]
    for key, label, form in (("perplexity", "perplexity", ".2f"),
                             ("exact_match", "exact match", ".3f"),
                             ("rouge_l", "ROUGE-L", ".3f")):  # causal-lm
        if record.get(key) is not None:
            parts.append(f"{label} {_number(record.get(key), form)}")
    if record.get("personal_accuracy") is not None:
        parts.append(f"personal accuracy {_number(record.get('personal_accuracy'), '.4f')}")
    if record.get("train_loss") is not None:
        parts.append(f"train loss {_number(record.get('train_loss'), '.4f')}")
    parts += [f"up {format_bytes(record.get('bytes_up'))}",
              f"down {format_bytes(record.get('bytes_down'))}",
              f"{_number(record.get('round_seconds'), '.1f')} s",
              f"elapsed {_number(record.get('elapsed_seconds'), '.1f')} s"]
    return f"{head}: " + ", ".join(parts)


def plural(count: int, noun: str) -> str:
    """``"1 round"``, ``"5 rounds"``: ``count`` and ``noun``, with an ``s`` unless count is 1."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_bytes(count: Any) -> str:
    """Human-readable binary size (``1.5 MiB``); ``?`` if ``count`` is not a finite number."""
    if not _is_number(count) or not math.isfinite(count):
        return "?"
    size, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


def _number(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec``; ``?`` if missing, ``nan``/``inf`` kept visible."""
    if not _is_number(value):
        return "?"
    if not math.isfinite(value):
        return str(float(value))
    return format(int(value) if spec == "d" else float(value), spec)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - a stream without isatty is not a terminal
        return False
