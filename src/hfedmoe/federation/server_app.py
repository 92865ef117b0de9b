"""The ServerApp: builds the global model, runs the strategy on any grid, writes the outputs.

``app`` is what Flower loads (``flwr run .``, deployment); it reads the run configuration from
``context.run_config``. ``make_server_app(flat_config)`` binds a configuration for runtimes
that pass none (Flower's ``run_simulation``). Both call :func:`run_server`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Mapping

from flwr.app import Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp

from hfedmoe import checkpoint as ckpt
from hfedmoe.config import SPLIT_METHODS, ConfigError, RunConfig, parse_run_config
from hfedmoe.federation import records
from hfedmoe.federation.grids import ProgressGrid
from hfedmoe.federation.loop import RoundPolicy, run_rounds
from hfedmoe.federation.rounds import RoundBook
from hfedmoe.federation.split_strategy import SplitStrategy
from hfedmoe.federation.strategy import PlannedStrategy, sample_size
from hfedmoe.fingerprint import first_difference
from hfedmoe.model.state import read_state, set_trainable, write_state
from hfedmoe.preflight import PreparedRun, prepare_run
from hfedmoe.progress import ProgressDisplay
from hfedmoe.report import RunRecorder, nothing_learned_reason
from hfedmoe.run_dir import set_aside_earlier_run
from hfedmoe.split import SplitModel
from hfedmoe.strategies import method_for
from hfedmoe.strategies.ho_sfl import SplitServer, split_method
from hfedmoe.tasks import task_for

FINAL_MODEL_DIR = "final-model"  # <out>/final-model: the model users load (README)
GENERATIONS_FILE = "generations.jsonl"  # causal-lm: greedy answers of each evaluated round

log = logging.getLogger(__name__)

def _reply_info(reply: Message) -> tuple[int, dict]:
    if reply.has_error():
        return -1, {"error": reply.error.reason.splitlines()[0] if reply.error.reason else "error"}
    metrics = reply.content.metric_records.get(records.METRICS, MetricRecord())
    info = {k: metrics[k] for k in records.REPLY_METRIC_KEYS if k in metrics}
    return int(info.get("client-id", -1)), info


def resume_point(config: RunConfig, inputs: Mapping[str, str]) -> ckpt.Checkpoint | None:
    """The checkpoint a run continues from (``checkpoint.resume``), or None for a new run.

    Raises ConfigError when there is none, or when it was made with other settings or other
    inputs (``inputs``: hfedmoe.fingerprint.input_fingerprints of this run). Reads only."""
    if not config.checkpoint.resume:
        return None
    root = Path(config.out) / ckpt.CHECKPOINT_DIR
    latest = ckpt.load_latest(root)
    if latest is None:
        raise ConfigError(f"config key 'checkpoint.resume' = True: no complete checkpoint in "
                          f"'{root}'")
    try:
        ckpt.check_resumable(latest.run_config, config.to_flat())
    except ValueError as exc:
        raise ConfigError(f"cannot resume from '{root}': {exc}") from None
    changed = first_difference(latest.strategy_state.get("inputs", {}), inputs)
    if changed:
        raise ConfigError(f"cannot resume from '{root}': {changed}; start a new run instead")
    return latest


def start_run_dir(config: RunConfig) -> Path | None:
    """For a new run, move an earlier run in ``config.out`` aside (hfedmoe.run_dir); returns
    where it went. Call only after :func:`hfedmoe.preflight.prepare_run` passed."""
    if config.checkpoint.resume:
        return None
    return set_aside_earlier_run(Path(config.out))


def run_server(grid: Grid, config: RunConfig, prepared: PreparedRun | None = None) -> dict:
    """Run ``config.num_server_rounds`` rounds on ``grid`` (from a checkpoint when
    ``checkpoint.resume``); returns the run summary. ``prepared``: :func:`prepare_run` of
    ``config`` when the caller already ran it (and :func:`start_run_dir`)."""
    started = time.perf_counter()
    own_preflight = prepared is None
    prepared = prepared or prepare_run(config)
    resumed = resume_point(config, prepared.inputs)
    if own_preflight and (aside := start_run_dir(config)) is not None:
        log.warning("moved the earlier run in %s to %s", config.out, aside)
    adapter, test_set, client_sizes = prepared.adapter, prepared.test_set, prepared.client_sizes
    for note in prepared.corpus.notes if own_preflight else ():  # else the caller said them
        log.warning("data: %s", note)
    task = task_for(config.task)
    params = set_trainable(adapter, config.model.trainable_non_expert)
    initial = records.to_array_record(resumed.global_state if resumed else read_state(params))
    calibration = prepared.calibration
    recorder = RunRecorder(Path(config.out), config, resumed.records if resumed else (),
                           inputs=prepared.inputs,
                           calibration_json=calibration.to_json() if calibration else None)
    earlier_seconds = resumed.elapsed_seconds if resumed else 0.0
    # names this run and its resumptions for the clients' personal state on disk
    lineage = (resumed.strategy_state.get("lineage") if resumed else None) or uuid.uuid4().hex
    if resumed:
        ckpt.restore_rng_states(resumed.rng)
    with ProgressDisplay() as display:
        clients = config.data.num_clients
        display.start(config.num_server_rounds, clients,
                      sample_size(config.train.fraction_train, clients),
                      name=f"{config.method}, seed {config.seed}")
        book = RoundBook(recorder, display)
        book.resume_after(earlier_seconds)
        server = None  # split learning's server side: its optimizers go into checkpoints
        if config.method in SPLIT_METHODS:  # split learning: its own round of two exchanges
            server = split_server(config, adapter, params, task.loss)
            if resumed:
                try:
                    server.load_state_dict(resumed.optimizer_state)
                except ValueError as exc:
                    root = Path(config.out) / ckpt.CHECKPOINT_DIR
                    raise ConfigError(f"cannot resume from '{root}': {exc}") from None
            strategy = SplitStrategy(config, server.method, adapter.geometry, book,
                                     client_sizes=client_sizes, lineage=lineage,
                                     server=server, params=params)
        else:
            strategy = PlannedStrategy(config, method_for(config), adapter.geometry, book,
                                       client_sizes=client_sizes, lineage=lineage,
                                       calibration=calibration,
                                       guidance=ckpt.tensors_from_json(
                                           resumed.strategy_state.get("guidance", {}))
                                       if resumed else None)

        def evaluate_global(server_round: int, arrays) -> MetricRecord:
            write_state(params, records.from_array_record(arrays))
            result = task.evaluate(adapter, test_set, config.train.eval_batch_size)
            metrics = dict(result.metrics)
            report = task.generation_report(adapter, prepared.tokenizer, prepared.corpus.test,
                                            config.generate)
            if report is not None:
                metrics.update(report.metrics)
                write_generations(Path(config.out), server_round, report.samples)
            book.evaluated(server_round, result.accuracy, result.loss, metrics)
            return MetricRecord({"accuracy": result.accuracy, "loss": result.loss, **metrics})

        def on_reply(reply: Message) -> None:
            # split learning reports its clients itself, once their loss is known
            if reply.metadata.message_type == MessageType.TRAIN and not (
                    not reply.has_error() and records.is_split_reply(reply.content)):
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
                                    config.to_flat(),
                                    {"lineage": lineage, "inputs": prepared.inputs,
                                     "guidance": ckpt.tensors_to_json(strategy.guidance)},
                                    rng=ckpt.rng_states(),
                                    optimizer_state=server.state_dict() if server else {}),
                    keep=config.checkpoint.keep)

        final = run_rounds(strategy, ProgressGrid(grid, on_reply), initial,
                           first_round=resumed.server_round + 1 if resumed else 1,
                           num_rounds=config.num_server_rounds,
                           policy=RoundPolicy.from_config(config.federation),
                           evaluate_fn=evaluate_global, after_round=save)
    write_state(params, records.from_array_record(final))
    task.export(adapter, prepared.tokenizer, Path(config.out) / FINAL_MODEL_DIR, config,
                prepared.corpus.label_names)
    return recorder.finish(earlier_seconds + time.perf_counter() - started)


def split_server(config: RunConfig, adapter, params, loss_fn) -> SplitServer:
    """The server side of a split-learning run on the server's model (``params``: its
    trainable parameters, the global state)."""
    method = split_method(config)
    return SplitServer(method, SplitModel(adapter, method.split_layer, params), loss_fn,
                       config.train.lr, config.ho_sfl.client_lr, config.train.weight_decay)


def write_generations(out_dir: Path, server_round: int, samples: list[dict[str, str]]) -> None:
    """Append one line ``{"round", "samples": [{"prompt", "reference", "generation"}]}`` to
    ``<out>/generations.jsonl`` (causal-lm; a new run starts the file afresh)."""
    path = out_dir / GENERATIONS_FILE
    mode = "w" if server_round == 0 else "a"
    with open(path, mode, encoding="utf-8") as file:
        file.write(json.dumps({"round": server_round, "samples": samples},
                              ensure_ascii=False) + "\n")


def make_server_app(flat_config: Mapping, prepared: PreparedRun | None = None) -> ServerApp:
    """A ServerApp bound to ``flat_config`` (for runtimes that pass no run_config), and to
    ``prepared`` when the caller prepared the run in this process."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, parse_run_config(flat_config), prepared)

    return bound


class NothingLearnedError(RuntimeError):
    """A run ended without any round aggregating a trained update (one-line message)."""


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    summary = run_server(grid, parse_run_config(context.run_config))
    reason = nothing_learned_reason(summary)
    if reason:  # `flwr run` marks the run failed instead of finished
        raise NothingLearnedError(reason)
