"""Atomic per-round checkpoints of the server, and reading the last complete one back.

Flower does not resume a run (docs/reliability.md); hfedmoe does, from these files::

    <out>/checkpoints/round-000003/
        global.pt      the global trainable state after round 3 (flat keys, float32)
        rng.pt         Python, NumPy and torch RNG states of the server process
        state.json     round number, elapsed seconds, method, the flat run configuration,
                       strategy state and the metrics records of rounds 0..3
        optimizer.pt   optimizer states the server holds across rounds (split learning's
                       two AdamW states; ``{}`` for the other methods, whose optimizers
                       live one round on the clients)
        MANIFEST.json  size and SHA-256 of the files above
        COMMIT         written last: a checkpoint without it is incomplete

Writing: every file goes to a temporary name in the same directory, is flushed and fsync'd,
then ``os.replace``d into place; the directory is built as ``round-N.partial`` and renamed when
its files are in place; COMMIT comes last and the directory is fsync'd after each rename.
Reading: checkpoints are tried newest first; one without COMMIT, with a missing file, or whose
files do not match MANIFEST.json (a torn or truncated write) is skipped with a warning in
favour of the one before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE, RNG_FILE, STATE_FILE = "global.pt", "rng.pt", "state.json"
OPTIMIZER_FILE = "optimizer.pt"  # absent from checkpoints written before 1 Dec 2026
MANIFEST_FILE, COMMIT_FILE = "MANIFEST.json", "COMMIT"
_NAME = re.compile(r"^round-(\d{6})$")


@dataclass(frozen=True)
class Checkpoint:
    server_round: int  # rounds completed
    global_state: dict[str, torch.Tensor]
    records: list[dict[str, Any]]  # metrics records of rounds 0..server_round
    elapsed_seconds: float  # wall time of the run up to this checkpoint
    run_config: dict[str, Any]  # flat resolved configuration of the run
    strategy_state: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)  # see rng_states()
    # name -> torch.optim.Optimizer.state_dict() of optimizers the server keeps across rounds
    optimizer_state: dict[str, Any] = field(default_factory=dict)


# keys a resumed run may change; any other difference is an error (it would be another run)
RESUMABLE_KEYS = ("num-server-rounds", "out", "federation.round-timeout",
                  "federation.sampling-deadline")
RESUMABLE_PREFIXES = ("simulation.", "checkpoint.")


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first key whose value differs and may not change."""
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_KEYS or key.startswith(RESUMABLE_PREFIXES):
            continue
        if saved.get(key) != current.get(key):
            raise ValueError(f"config key '{key}' = {current.get(key)!r} differs from the "
                             f"checkpoint's {saved.get(key)!r}; a resumed run must keep it")


def tensors_to_json(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Small float tensors as JSON (``{name: {"shape": [...], "values": [...]}}``), exactly:
    float32 values survive the round trip through Python floats."""
    return {name: {"shape": list(t.shape), "values": t.detach().float().reshape(-1).tolist()}
            for name, t in tensors.items()}


def tensors_from_json(saved: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`tensors_to_json` (float32)."""
    return {name: torch.tensor(entry["values"], dtype=torch.float32).reshape(entry["shape"])
            for name, entry in saved.items()}


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def restore_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def save_checkpoint(root: Path, checkpoint: Checkpoint, keep: int) -> Path:
    """Write ``checkpoint`` atomically under ``root``; keep the ``keep`` newest complete ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{checkpoint.server_round:06d}"
    partial = root / f"{final.name}.partial"
    for stale in (partial, final):
        if stale.exists():
            shutil.rmtree(stale)
    partial.mkdir()
    state = {"server_round": checkpoint.server_round,
             "elapsed_seconds": checkpoint.elapsed_seconds,
             "run_config": checkpoint.run_config,
             "strategy_state": checkpoint.strategy_state,
             "records": checkpoint.records}
    _write_durably(partial / MODEL_FILE, _torch_bytes(
        {k: v.detach().cpu().contiguous() for k, v in checkpoint.global_state.items()}))
    _write_durably(partial / RNG_FILE, _torch_bytes(checkpoint.rng or rng_states()))
    _write_durably(partial / STATE_FILE, json.dumps(state, allow_nan=True).encode())
    _write_durably(partial / OPTIMIZER_FILE, _torch_bytes(checkpoint.optimizer_state))
    manifest = {name: _digest(partial / name)
                for name in (MODEL_FILE, RNG_FILE, STATE_FILE, OPTIMIZER_FILE)}
    _write_durably(partial / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    os.replace(partial, final)
    _fsync_dir(root)
    _write_durably(final / COMMIT_FILE, f"round {checkpoint.server_round}\n".encode())
    _prune(root, keep)
    return final


def load_latest(root: Path) -> Checkpoint | None:
    """The newest complete, intact checkpoint under ``root``, or None if there is none."""
    for directory in sorted(_complete_candidates(root), reverse=True):
        try:
            return _load(directory)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("ignoring checkpoint %s: %s", directory, exc)
    return None


def _load(directory: Path) -> Checkpoint:
    if not (directory / COMMIT_FILE).is_file():
        raise ValueError("no COMMIT marker (the write did not finish)")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    optional = [OPTIMIZER_FILE] if OPTIMIZER_FILE in manifest else []
    for name in (MODEL_FILE, RNG_FILE, STATE_FILE, *optional):
        if _digest(directory / name) != manifest.get(name):
            raise ValueError(f"{name} does not match MANIFEST.json (torn or truncated write)")
    state = json.loads((directory / STATE_FILE).read_text())
    return Checkpoint(
        server_round=int(state["server_round"]),
        global_state=torch.load(directory / MODEL_FILE, weights_only=True),
        records=list(state["records"]),
        elapsed_seconds=float(state["elapsed_seconds"]),
        run_config=dict(state["run_config"]),
        strategy_state=dict(state.get("strategy_state", {})),
        # our own file, checksummed above; Python's RNG state is a tuple, not a tensor
        rng=torch.load(directory / RNG_FILE, weights_only=False),
        optimizer_state=(torch.load(directory / OPTIMIZER_FILE, weights_only=True)
                         if optional else {}),
    )


def _complete_candidates(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if d.is_dir() and _NAME.match(d.name)]


def _prune(root: Path, keep: int) -> None:
    complete = sorted(d for d in _complete_candidates(root) if (d / COMMIT_FILE).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    newest = complete[-1].name if complete else ""
    for leftover in root.glob("round-*.partial"):
        if leftover.name < newest:
            shutil.rmtree(leftover, ignore_errors=True)


def _torch_bytes(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_durably(path: Path, data: bytes) -> None:
    """temp file in the same directory -> write -> flush -> fsync -> rename -> fsync dir."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
