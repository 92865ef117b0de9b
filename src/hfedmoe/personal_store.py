"""A client's personal state on its own disk, so that a resumed run continues it.

Methods with a personal part (``flex``: personal experts and routers) keep it in the node's
Flower ``Context`` between rounds. That context lives for one Flower run; a run resumed from a
checkpoint is a new Flower run, so the client also writes its personal state here, one file
per round it trained::

    <state-dir>/<lineage>/client-<partition>/round-000003.pt

``state-dir`` is the node config's ``state-dir`` (deployment: each SuperNode's own disk) or
``<out>/client-state``. ``lineage`` names the run and every resumption of it (the server draws
it at a fresh start and keeps it in its checkpoints), so a new run in the same directory never
picks up an earlier run's state. A client whose context is empty (the first round of a resumed
run) continues from the newest round at or before the one it needs: round r - 1 for training in
round r, round r for the personalised evaluation after round r - so the resumed run equals the
uninterrupted one even when the server had finished a later round than its last checkpoint.
Files are written to a temporary name and renamed (an interrupted write leaves no torn file).
The ``checkpoint.every`` + 1 newest rounds are kept (:func:`rounds_to_keep`): the server's
newest checkpoint is at most ``checkpoint.every`` rounds behind the last round a client
trained, so the state that checkpoint needs is never pruned.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

CLIENT_STATE_DIR = "client-state"  # under <out> unless the node config names a state-dir
_NAME = re.compile(r"^round-(\d{6})\.pt$")


def rounds_to_keep(checkpoint_every: int) -> int:
    """Stored rounds a client keeps: checkpoint.every + 1, at least 2 (0 = no checkpoints)."""
    return max(2, checkpoint_every + 1)


@dataclass(frozen=True)
class PersonalStore:
    directory: Path  # <state-dir>/<lineage>/client-<partition>
    keep: int = 2  # newest rounds kept (rounds_to_keep)

    @classmethod
    def for_client(cls, state_dir: str | Path, lineage: str, partition_id: int, keep: int = 2
                   ) -> "PersonalStore":
        return cls(Path(state_dir) / lineage / f"client-{partition_id}", keep)

    def _file(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round:06d}.pt"

    def rounds(self) -> list[int]:
        """The rounds stored, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for name in os.listdir(self.directory)
                      if (m := _NAME.match(name)))

    def save(self, server_round: int, state: Mapping[str, torch.Tensor]) -> None:
        """Store the personal state after ``server_round``; drop all but the ``keep`` newest."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._file(server_round)
        partial = path.with_name(path.name + ".partial")
        torch.save({key: tensor.detach().cpu() for key, tensor in state.items()}, partial)
        os.replace(partial, path)
        for old in self.rounds()[:-self.keep]:
            self._file(old).unlink(missing_ok=True)

    def load(self, up_to_round: int) -> dict[str, torch.Tensor]:
        """The newest stored state of a round <= ``up_to_round`` (empty if none)."""
        stored = [r for r in self.rounds() if r <= up_to_round]
        if not stored:
            return {}
        return torch.load(self._file(stored[-1]), weights_only=True)
