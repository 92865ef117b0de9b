"""The ServerApp: builds the global model, runs the strategy on any grid, writes the outputs.

``app`` is what Flower loads (``flwr run .``, deployment); it reads the run configuration from
``context.run_config``. ``make_server_app(flat_config)`` binds a configuration for runtimes
that pass none (Flower's ``run_simulation``). Both call :func:`run_server`.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Mapping

from flwr.app import Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp

from hfedmoe import checkpoint as ckpt
from hfedmoe.client import build_model
from hfedmoe.config import ConfigError, RunConfig, parse_run_config
from hfedmoe.costs import client_budget
from hfedmoe.data import client_split_sizes, load_corpus, tokenize
from hfedmoe.federation import records
from hfedmoe.federation.grids import ProgressGrid
from hfedmoe.federation.loop import RoundPolicy, run_rounds
from hfedmoe.federation.rounds import RoundBook
from hfedmoe.federation.strategy import PlannedStrategy
from hfedmoe.model import load_tokenizer
from hfedmoe.model.state import read_state, set_trainable, write_state
from hfedmoe.personal_store import CLIENT_STATE_DIR
from hfedmoe.progress import ProgressDisplay
from hfedmoe.report import RunRecorder
from hfedmoe.strategies import method_for
from hfedmoe.training import evaluate

def _reply_info(reply: Message) -> tuple[int, dict]:
    if reply.has_error():
        return -1, {"error": reply.error.reason.splitlines()[0] if reply.error.reason else "error"}
    metrics = reply.content.metric_records.get(records.METRICS, MetricRecord())
    info = {k: metrics[k] for k in records.REPLY_METRIC_KEYS if k in metrics}
    return int(info.get("client-id", -1)), info


def preflight(config: RunConfig, corpus, adapter) -> list[int]:
    """Fail before round 1, not in every client every round: the partitions must exist and
    every configured client budget must resolve (node-config budgets are checked by clients).
    Returns each client's number of training examples (the bound of its ``num-examples``)."""
    sizes = [train for train, _ in client_split_sizes(corpus.train.labels, config.data,
                                                      config.seed)]
    for client_id in range(config.data.num_clients):
        try:
            client_budget(adapter, config, client_id)
        except ValueError as exc:
            raise ConfigError(f"config key 'budget.experts' = {config.budget.experts!r}: "
                              f"client {client_id}: {exc}") from None
    return sizes


def resume_point(config: RunConfig) -> ckpt.Checkpoint | None:
    """The checkpoint a run continues from (``checkpoint.resume``), or None for a new run,
    whose earlier checkpoints (and simulated clients' personal states) in the same directory
    are then deleted."""
    root = Path(config.out) / ckpt.CHECKPOINT_DIR
    if not config.checkpoint.resume:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(Path(config.out) / CLIENT_STATE_DIR, ignore_errors=True)
        return None
    latest = ckpt.load_latest(root)
    if latest is None:
        raise ConfigError(f"config key 'checkpoint.resume' = True: no complete checkpoint in "
                          f"'{root}'")
    try:
        ckpt.check_resumable(latest.run_config, config.to_flat())
    except ValueError as exc:
        raise ConfigError(f"cannot resume from '{root}': {exc}") from None
    return latest


def run_server(grid: Grid, config: RunConfig) -> dict:
    """Run ``config.num_server_rounds`` rounds on ``grid`` (from a checkpoint when
    ``checkpoint.resume``); returns the run summary."""
    started = time.perf_counter()
    corpus = load_corpus(config.data)
    test_set = tokenize(corpus.test, load_tokenizer(config.model), config.model.max_length)
    adapter = build_model(config, num_labels=len(corpus.label_names))
    client_sizes = preflight(config, corpus, adapter)
    params = set_trainable(adapter, config.model.trainable_non_expert)
    resumed = resume_point(config)
    initial = records.to_array_record(resumed.global_state if resumed else read_state(params))
    recorder = RunRecorder(Path(config.out), config, resumed.records if resumed else ())
    earlier_seconds = resumed.elapsed_seconds if resumed else 0.0
    # names this run and its resumptions for the clients' personal state on disk
    lineage = (resumed.strategy_state.get("lineage") if resumed else None) or uuid.uuid4().hex
    if resumed:
        ckpt.restore_rng_states(resumed.rng)
    with ProgressDisplay() as display:
        display.start(config.num_server_rounds, config.data.num_clients)
        book = RoundBook(recorder, display)
        book.resume_after(earlier_seconds)
        strategy = PlannedStrategy(config, method_for(config), adapter.geometry, book,
                                   client_sizes=client_sizes, lineage=lineage)

        def evaluate_global(server_round: int, arrays) -> MetricRecord:
            write_state(params, records.from_array_record(arrays))
            accuracy, loss = evaluate(adapter, test_set, config.train.eval_batch_size)
            book.evaluated(server_round, accuracy, loss)
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        def on_reply(reply: Message) -> None:
            if reply.metadata.message_type == MessageType.TRAIN:
                client_id, info = _reply_info(reply)
                display.client_finished(int(reply.metadata.group_id or 0), client_id, info)

        def save(server_round: int, arrays) -> None:
            every = config.checkpoint.every
            if every and (server_round % every == 0 or server_round == config.num_server_rounds):
                ckpt.save_checkpoint(
                    Path(config.out) / ckpt.CHECKPOINT_DIR,
                    ckpt.Checkpoint(server_round, records.from_array_record(arrays),
                                    recorder.records,
                                    earlier_seconds + time.perf_counter() - started,
                                    config.to_flat(), {"lineage": lineage},
                                    rng=ckpt.rng_states()),
                    keep=config.checkpoint.keep)

        run_rounds(strategy, ProgressGrid(grid, on_reply), initial,
                   first_round=resumed.server_round + 1 if resumed else 1,
                   num_rounds=config.num_server_rounds,
                   policy=RoundPolicy.from_config(config.federation),
                   evaluate_fn=evaluate_global, after_round=save)
    return recorder.finish(earlier_seconds + time.perf_counter() - started)


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
