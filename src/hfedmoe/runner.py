"""Launch a run on one of the runtimes; the same ServerApp/ClientApp code runs in each.

* ``ray``       - Flower's simulation runtime (Ray actors run the ClientApp).
* ``inprocess`` - the ClientApp runs in this process, one client after another (tests).
Deployment (SuperLink + SuperNodes, ``flwr run``) loads ``hfedmoe.federation.server_app:app``
and reads the same keys from the run config.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from hfedmoe.config import RunConfig

if TYPE_CHECKING:
    from hfedmoe.preflight import PreparedRun

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no "Loading weights" bar per client and round
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # the CPU memory measurement (hfedmoe.measurement.AllocatorPeak) runs torch's profiler:
    # without these, every profiled step prints kineto's stage lines and c10 a warning
    "KINETO_LOG_LEVEL": "10",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}


def prepare_environment(verbose: bool = False) -> None:
    """Offline, quiet defaults for this process and its children (user settings win).

    Flower's own INFO log is silenced unless ``verbose``: the progress display reports rounds.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.common.logger import update_console_handler

    update_console_handler(level=logging.INFO if verbose else logging.WARNING)


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


@contextmanager
def run_simulation_deprecation_quiet() -> Iterator[None]:
    """Drop the one warning Flower logs on every ``flwr.simulation.run_simulation`` call (that
    it is deprecated in favour of ``flwr run``): ``simulation.runtime = "ray"`` calls it on
    purpose, and ``flwr run`` is supported beside it (README, "Runtimes"). Every other record of
    Flower's logger passes; ``--verbose`` shows Flower's INFO log as before."""
    flower = logging.getLogger("flwr")
    quiet = _DropRunSimulationDeprecation()
    flower.addFilter(quiet)
    try:
        yield
    finally:
        flower.removeFilter(quiet)


def run_experiment(config: RunConfig, verbose: bool = False,
                   report: Callable[[str], None] = print) -> dict:
    """Run ``config`` to completion on its runtime; returns the summary (also in summary.json).

    Every check that can fail before round 1 (hfedmoe.preflight) runs first, in this process,
    before the output directory is touched or a runtime starts; an earlier run in
    ``config.out`` is then moved aside (hfedmoe.run_dir) and ``report`` says where to."""
    prepare_environment(verbose)
    from hfedmoe.federation.server_app import resume_point, start_run_dir
    from hfedmoe.preflight import prepare_run

    prepared = prepare_run(config)
    resume_point(config, prepared.inputs)
    aside = start_run_dir(config)
    if aside is not None:
        report(f"hfedmoe: moved the earlier run in {config.out} to {aside}")
    for note in prepared.corpus.notes:
        report(f"hfedmoe: data: {note}")
    if config.simulation.runtime == "inprocess":
        return _run_inprocess(config, prepared)
    return _run_ray(config, prepared)


def _run_inprocess(config: RunConfig, prepared: PreparedRun) -> dict:
    import torch

    from hfedmoe.federation.client_app import app as client_app
    from hfedmoe.federation.grids import InProcessGrid
    from hfedmoe.federation.server_app import run_server

    torch.set_num_threads(config.simulation.client_cpus)
    return run_server(InProcessGrid(client_app, config.data.num_clients), config, prepared)


def _run_ray(config: RunConfig, prepared: PreparedRun) -> dict:
    # Ray workers inherit this process's environment (prepare_environment ran above).
    from flwr.simulation import run_simulation

    from hfedmoe.federation.client_app import app as client_app
    from hfedmoe.federation.server_app import make_server_app
    from hfedmoe.federation.simulation_engine import addressed_nodes_only

    summary_file = Path(config.out) / "summary.json"  # a resumed run's is stale
    summary_file.unlink(missing_ok=True)
    # Flower's engine asks only nodes with a waiting message
    with addressed_nodes_only(), run_simulation_deprecation_quiet():
        run_simulation(
            server_app=make_server_app(config.to_flat(), prepared),
            client_app=client_app,
            num_supernodes=config.data.num_clients,
            backend_config={
                "client_resources": {"num_cpus": config.simulation.client_cpus,
                                     "num_gpus": 0.0},
                "init_args": {"num_cpus": max(os.cpu_count() or 1,
                                              config.simulation.client_cpus),
                              "include_dashboard": False},
            },
        )
    if not summary_file.is_file():
        raise RuntimeError("the simulation ended without writing summary.json; see the log above")
    return json.loads(summary_file.read_text(encoding="utf-8"))
