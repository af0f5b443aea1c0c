"""Training-step time of the two hash-encoded families with the hash encoding on its fused CPU
kernel against the encoding as PyTorch ops, at their default batch sizes and an image's table
size (everything else, the KAN layer's own kernel included, the same in both).

One step = forward + MSE + backward + fused Adam on a random batch of coordinates, as the
Trainer runs it. Both paths are timed in the same run, interleaved round by round so machine noise
hits them alike; the figure is the median step time of the rounds.

    python benchmarks/bench_hashgrid.py                          # a 741×500 photo, 2 threads
    python benchmarks/bench_hashgrid.py --size 256x256 --json runs/bench_hashgrid.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from kanimg.fitting import model_spec_for, train_config_for
from kanimg.models import build_model
from kanimg.nn import hashgrid
from kanimg.nn.packed_spline import fused_path as default_path

FAMILIES = ("kan", "hashgrid")
PATHS = {"fused": True, "torch": False}  # the encoding on its kernel, or as PyTorch ops


def step_seconds(model: torch.nn.Module, batch: int, steps: int, fused: bool) -> float:
    """Median time of one training step over ``steps`` steps (after 3 untimed ones)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.rand(batch, 2) * 2 - 1, torch.rand(batch, model(torch.zeros(1, 2)).shape[1])
    times = []
    with mock.patch.object(hashgrid, "fused_path", lambda device, dtype: fused and default_path(device, dtype)):
        for i in range(steps + 3):
            start = time.perf_counter()
            loss = (model(x) - y).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= 3:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="500x741", help="image size HxW the encoding is sized for (default: 500x741)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.lower().split("x"))
    results = []
    for family in FAMILIES:
        torch.manual_seed(0)
        spec = model_spec_for(family, {}, args.channels, (height, width))
        batch = train_config_for(family, {}).batch_size
        model = build_model(family, **spec)
        rounds: dict[str, list[float]] = {path: [] for path in PATHS}
        for _ in range(args.rounds):
            for path, fused in PATHS.items():
                rounds[path].append(step_seconds(model, batch, args.steps, fused))
        times = {path: statistics.median(values) for path, values in rounds.items()}
        results.append({"family": family, "batch_size": batch, "log2_table_size": spec["log2_table_size"],
                        "finest_resolution": spec["finest_resolution"],
                        **{f"{path}_ms_per_step": 1e3 * seconds for path, seconds in times.items()},
                        "speedup": times["torch"] / times["fused"]})
        print(f"{family:9s} batch {batch:5d}  table 2^{spec['log2_table_size']}  fused {1e3 * times['fused']:7.2f} ms/step  "
              f"encoding as PyTorch ops {1e3 * times['torch']:7.2f} ms/step  {times['torch'] / times['fused']:.2f}x", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": [height, width], "threads": args.threads, "torch": torch.__version__,
                                         "machine": platform.processor() or platform.machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
