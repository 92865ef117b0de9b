"""Start and stop groups of local processes; every wait bounded (used by ``hfedmoe deploy``
and the deployment tests).

Flower's SuperLink and SuperNode start children (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``), some in sessions of their own, so stopping a process group is not
enough: :func:`stop` also signals every descendant it finds in /proc (Linux).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence


def wait_for_port(host: str, port: int, seconds: float,
                  process: subprocess.Popen | None = None) -> None:
    """Return once ``host:port`` accepts TCP connections; raise after ``seconds`` or if
    ``process`` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {seconds:.0f} s")


def start(command: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in a session of its own (stop it with :func:`stop`), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; Flower detaches some into new sessions)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def stop(processes: Sequence[subprocess.Popen], grace_seconds: float = 20) -> None:
    """SIGTERM each process's group and every descendant, then SIGKILL what is left."""
    targets = {pid for p in processes for pid in [p.pid, *_descendants(p.pid)]}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if sig == signal.SIGKILL and not _running(processes, targets):
            break
        for p in processes:
            _signal_group(p.pid, sig)
        for pid in targets:
            _signal(pid, sig)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and _running(processes, targets):
            time.sleep(0.2)
    for p in processes:
        p.wait(timeout=10)


def _running(processes: Sequence[subprocess.Popen], pids: set[int]) -> bool:
    return any(p.poll() is None for p in processes) or any(map(_alive, pids))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """True for a running process (a zombie child of someone else counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
