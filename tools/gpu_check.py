"""GPU check of the expert kernel (issue #12 item 2, #13 item 8): host synchronisations and
step time per training step on CUDA, for the plain path (sync-free and host dispatch) and the
one-pass budgeted path, in float32 and under bf16 autocast.

    .venv/bin/python tools/make_bench_moe.py runs/bench-moe
    .venv/bin/python tools/gpu_check.py runs/bench-moe [--json FILE]

Host synchronisations are counted with ``torch.cuda.set_sync_debug_mode("warn")`` (each
synchronising call warns once per occurrence). The budgeted path's choice is a fixed device
mask (a quarter of each layer's experts), so the count is the kernel's own, not the
selector's. Prints one line per configuration; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

from hfedmoe.config import parse_run_config
from hfedmoe.model import load_adapter


def _step(adapter, ids, mask, active) -> None:
    model = adapter.model
    if active is None:
        logits = model(ids, mask)
    else:
        with adapter.budgeted_experts(lambda layer: active[layer]):
            logits = model(ids, mask)
    logits.logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _syncs(adapter, ids, mask, active) -> int:
    if not ids.is_cuda:
        return -1  # a dry run on the CPU: nothing to count
    _step(adapter, ids, mask, active)  # warm: one-time initialisation synchronises too
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(adapter, ids, mask, active)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _time(adapter, ids, mask, active, repeats: int) -> float:
    for _ in range(3):
        _step(adapter, ids, mask, active)
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        _step(adapter, ids, mask, active)
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    cuda = args.device.startswith("cuda")
    rows = []
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")
    for precision in ("fp32", "bf16-mixed"):
        config = parse_run_config({"model.name": args.model, "model.device": args.device,
                                   "model.precision": precision})
        adapter = load_adapter(config.model, num_labels=4, seed=0)
        adapter.model.train()
        layers, experts = adapter.geometry.num_layers, adapter.geometry.num_experts
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30000, (args.batch, args.tokens), generator=generator).to(args.device)
        mask = torch.ones_like(ids)
        quarter = torch.zeros(layers, experts, dtype=torch.bool, device=args.device)
        quarter[:, : max(1, experts // 4)] = True
        for name, active, sync_free in (("plain, sync-free", None, True),
                                        ("plain, host dispatch", None, False),
                                        ("one-pass, 1/4 of experts", quarter, None)):
            for bank in adapter.banks:
                bank.sync_free = sync_free
            syncs = _syncs(adapter, ids, mask, active)
            seconds = _time(adapter, ids, mask, active, args.repeats)
            row = {"precision": precision, "path": name, "host_syncs_per_step": syncs,
                   "moe_layers": layers, "step_seconds": seconds,
                   "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
            rows.append(row)
            print(f"{precision:>10} | {name:<26} | host syncs/step {syncs:4d} "
                  f"({layers} MoE layers) | step {seconds * 1e3:8.2f} ms")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        del adapter
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
