"""Injected client faults and attacks, for testing resilience (``[faults]``, off by default).

Run inside the ClientApp (hfedmoe.federation.client_app), around an honest client round:

* failures - ``faults.client-failure-rate`` = r: in every round, round(r * N) of the N clients
  (``data.num-clients``; half rounds up) fail. Which ones is a seeded draw per (seed, round)
  (``random.Random("<seed>/fault/<round>")``, not crc32: crc32 is affine, so the ranks of
  similar strings are strongly correlated and the same clients would fail round after round),
  so every process agrees without talking and a test knows the failing set in advance
  (:func:`failing_clients`). Of a sampled subset, the failing share is r on average. Under
  split learning (ho-sfl, sfl) a failing client fails in the round's second exchange, after
  it sent its activations: the drop between the two exchanges (zo-sfl has one exchange).
  ``faults.failure-mode``: ``raise`` - the ClientApp raises before training (Flower turns it
  into an error reply); ``hang`` - it sleeps ``federation.round-timeout`` + 2 s, then trains
  and replies normally: the server must count it as timed out.
* attacks - the clients in ``faults.attackers`` train honestly, then replace every tensor
  they upload (experts, routers, other trainables) by g - s * (x - g) (``sign-flip``) or
  g + s * (x - g) (``scale``), g the global value, x the honest upload,
  s = ``faults.attack-scale``. Their metrics and routing statistics stay honest, so the reply
  passes every consistency check except, for a large enough delta,
  ``federation.max-update-norm``.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Mapping

import torch

from hfedmoe.config import FaultsConfig, RunConfig

HANG_MARGIN_SECONDS = 2.0  # a hanging client sleeps this much past the round timeout


class InjectedFailure(RuntimeError):
    """A client failure injected by ``faults.client-failure-rate``."""


def failing_clients(seed: int, server_round: int, num_clients: int, rate: float
                    ) -> frozenset[int]:
    """The clients that fail in ``server_round``: round(rate * num_clients) of them, drawn
    uniformly by a generator seeded with (seed, round)."""
    count = int(rate * num_clients + 0.5)
    draw = random.Random(f"{seed}/fault/{server_round}")  # str seeds hash stably (SHA-512)
    return frozenset(draw.sample(range(num_clients), count))


def inject_failure(config: RunConfig, client_id: int, server_round: int,
                   sleep: Callable[[float], None] = time.sleep) -> None:
    """Raise (``raise``) or sleep past the round timeout (``hang``) if this client fails
    this round; otherwise (and always with rate 0) return at once."""
    faults = config.faults
    if faults.client_failure_rate <= 0 or client_id not in failing_clients(
            config.seed, server_round, config.data.num_clients, faults.client_failure_rate):
        return
    if faults.failure_mode == "raise":
        raise InjectedFailure(f"injected failure of client {client_id} in round {server_round} "
                              f"(faults.client-failure-rate = {faults.client_failure_rate})")
    sleep(config.federation.round_timeout + HANG_MARGIN_SECONDS)


def attacked_upload(faults: FaultsConfig, client_id: int, upload: Mapping[str, torch.Tensor],
                    global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The upload of ``client_id``: ``upload`` itself unless it is an attacker (see the module
    docstring)."""
    if client_id not in faults.attacker_ids:
        return dict(upload)
    sign = -1.0 if faults.attack == "sign-flip" else 1.0
    factor = sign * faults.attack_scale
    return {key: (global_state[key].double()
                  + factor * (tensor.double() - global_state[key].double())).to(tensor.dtype)
            for key, tensor in upload.items()}
