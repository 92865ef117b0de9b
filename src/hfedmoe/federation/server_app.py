"""The ServerApp: builds the global model, runs the strategy on any grid, writes the outputs.

``app`` is what Flower loads (``flwr run .``, deployment); it reads the run configuration from
``context.run_config``. ``make_server_app(flat_config)`` binds a configuration for runtimes
that pass none (Flower's ``run_simulation``). Both call :func:`run_server`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

from flwr.app import Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from hfedmoe.client import build_model
from hfedmoe.config import ConfigError, RunConfig, parse_run_config
from hfedmoe.costs import client_budget
from hfedmoe.data import load_corpus, partition_indices, tokenize
from hfedmoe.federation import records
from hfedmoe.federation.grids import ProgressGrid
from hfedmoe.federation.rounds import RoundBook
from hfedmoe.federation.strategy import PlannedStrategy
from hfedmoe.model import load_tokenizer
from hfedmoe.model.state import read_state, set_trainable, write_state
from hfedmoe.progress import ProgressDisplay
from hfedmoe.report import RunRecorder
from hfedmoe.strategies import method_for
from hfedmoe.training import evaluate

ROUND_TIMEOUT_SECONDS = 3600.0


def _reply_info(reply: Message) -> tuple[int, dict]:
    if reply.has_error():
        return -1, {"error": reply.error.reason.splitlines()[0] if reply.error.reason else "error"}
    metrics = reply.content.metric_records.get(records.METRICS, MetricRecord())
    info = {k: metrics[k] for k in records.REPLY_METRIC_KEYS if k in metrics}
    return int(info.get("client-id", -1)), info


def preflight(config: RunConfig, corpus, adapter) -> None:
    """Fail before round 1, not in every client every round: the partitions must exist and
    every configured client budget must resolve (node-config budgets are checked by clients)."""
    partition_indices(corpus.train.labels, config.data, config.seed)
    for client_id in range(config.data.num_clients):
        try:
            client_budget(adapter, config, client_id)
        except ValueError as exc:
            raise ConfigError(f"config key 'budget.experts' = {config.budget.experts!r}: "
                              f"client {client_id}: {exc}") from None


def run_server(grid: Grid, config: RunConfig) -> dict:
    """Run ``config.num_server_rounds`` rounds on ``grid``; returns the run summary."""
    started = time.perf_counter()
    corpus = load_corpus(config.data)
    test_set = tokenize(corpus.test, load_tokenizer(config.model), config.model.max_length)
    adapter = build_model(config, num_labels=len(corpus.label_names))
    preflight(config, corpus, adapter)
    params = set_trainable(adapter, config.model.trainable_non_expert)
    recorder = RunRecorder(Path(config.out), config)
    with ProgressDisplay() as display:
        display.start(config.num_server_rounds, config.data.num_clients)
        book = RoundBook(recorder, display)
        strategy = PlannedStrategy(config, method_for(config), adapter.geometry, book)

        def evaluate_global(server_round: int, arrays) -> MetricRecord:
            write_state(params, records.from_array_record(arrays))
            accuracy, loss = evaluate(adapter, test_set, config.train.eval_batch_size)
            book.evaluated(server_round, accuracy, loss)
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        def on_reply(reply: Message) -> None:
            client_id, info = _reply_info(reply)
            display.client_finished(int(reply.metadata.group_id or 0), client_id, info)

        strategy.start(
            grid=ProgressGrid(grid, on_reply),
            initial_arrays=records.to_array_record(read_state(params)),
            num_rounds=config.num_server_rounds,
            timeout=ROUND_TIMEOUT_SECONDS,
            evaluate_fn=evaluate_global,
        )
    return recorder.finish(time.perf_counter() - started)


def make_server_app(flat_config: Mapping) -> ServerApp:
    """A ServerApp bound to ``flat_config`` (for runtimes that pass no run_config)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, parse_run_config(flat_config))

    return bound


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, parse_run_config(context.run_config))
