"""Test-wide settings: offline, quiet, one torch thread (CI has 2 shared cores; oversubscribed
torch threads make small CPU kernels 10x slower and timings meaningless)."""

import os

from hfedmoe.runner import OFFLINE_ENV

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

torch.set_num_threads(1)
