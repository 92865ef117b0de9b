"""The output directory of a new run: an earlier run in it is moved aside, never destroyed.

A new run (not ``--resume``) replaces its directory's ``config.toml``, ``metrics.jsonl``,
``summary.json``, plots and ``checkpoints/``. When ``out`` already holds any of a run's files,
:func:`set_aside_earlier_run` first renames the whole directory to ``<out>.1`` (or ``.2``, ...:
the first free suffix) and says so, so that nothing of the earlier run, finished or
interrupted, is lost by pointing a new run at the same place. It is called only after every
check that can fail before round 1 has passed (``hfedmoe.preflight``).
"""

from __future__ import annotations

import os
from pathlib import Path

from hfedmoe.checkpoint import CHECKPOINT_DIR
from hfedmoe.personal_store import CLIENT_STATE_DIR
from hfedmoe.report import CONFIG_FILE, INPUTS_FILE, METRICS_FILE, SUMMARY_FILE

RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, INPUTS_FILE, CHECKPOINT_DIR,
             CLIENT_STATE_DIR)


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds any file a run writes (an earlier run, finished or not)."""
    return out.is_dir() and any((out / name).exists() for name in RUN_FILES)


def set_aside_earlier_run(out: Path) -> Path | None:
    """Rename ``out`` to ``<out>.N`` (first free N >= 1) if it holds a run; returns the new
    path (None: nothing to move). Raises OSError if the rename fails."""
    out = Path(out)
    if not holds_run(out):
        return None
    number = 1
    while (aside := out.with_name(f"{out.name}.{number}")).exists():
        number += 1
    os.replace(out, aside)
    return aside
