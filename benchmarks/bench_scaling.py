"""How kanimg scales over processes on this machine: one process against torchrun with N.

    python benchmarks/bench_scaling.py -o runs/bench-scaling                 # compare: 4 photos × kan, rff, 2 processes
    python benchmarks/bench_scaling.py --processes 2 --steps 300 --photos 2  # a quicker look
    python benchmarks/bench_scaling.py --fit IMAGE --steps 1000              # one data-parallel fit

compare: the same comparison (photos × models, equal steps), its runs shared out among the
ranks. fit: one model trained data-parallel (each rank computes 1/N of every batch), against
one process: steps per second and the training time each needed to reach the PSNR both
reached. One process uses every CPU thread; under torchrun each of the N processes gets 1/N of
them (kanimg.distributed), so on one CPU the total compute is the same and the speed-up
measures how much better N narrower processes use it than one wide one. Prints the figures
and writes benchmarks/results/bench_scaling[-fit].json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from inr_bench import EVAL, write_photos

from kanimg.files import write_json
from kanimg.results import machine, versions

RESULTS = Path(__file__).resolve().parent / "results"


def launchers(processes: int) -> dict[str, list[str]]:
    """The command prefixes of the two ways to run kanimg: one process, torchrun with N."""
    return {"one_process": [sys.executable, "-m", "kanimg"],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "kanimg"]}


def report(title: str, rows: dict[str, dict], columns: str, speedup: float, processes: int, name: str, result: dict) -> None:
    """Print one line per way of running (``columns`` formatted with its row) and write the JSON."""
    print(title)
    for label, row in zip(("1 process", f"torchrun × {processes}"), rows.values()):
        print(f"  {label:14s} " + columns.format(**row))
    print(f"  speed-up {speedup:.2f}×, efficiency {speedup / processes:.2f}")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / name, result)


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def summary(folder: Path, wall: float) -> dict:
    records = json.loads((folder / "results.json").read_text())["records"]
    return {"wall_seconds": wall, "runs": len(records), "train_seconds": sum(r["seconds"] for r in records),
            "steps": sum(r["steps"] for r in records), "steps_per_wall_second": sum(r["steps"] for r in records) / wall,
            "mean_psnr": statistics.mean(r["psnr"] for r in records), "ranks": sorted({r["rank"] for r in records})}


def time_to(history: dict, psnr: float) -> float | None:
    """Training seconds at the first evaluation that reached ``psnr``."""
    return next((t for t, p in zip(history["eval_seconds"], history["eval_psnr"]) if p >= psnr), None)


def bench_fit(args: argparse.Namespace, stamp: str) -> int:
    common = ["fit", str(args.fit), "--steps", str(args.steps), "--eval-every", str(max(1, args.steps // 20)), "-q"]
    runs = {}
    for label, launcher in launchers(args.processes).items():
        out = args.out / f"fit-{label}-{stamp}"
        wall = timed([*launcher, *common, "-o", str(out)])
        metrics = json.loads((out / "metrics.json").read_text())
        runs[label] = {"wall_seconds": wall, "train_seconds": metrics["train_seconds"], "steps_per_second": metrics["steps_per_second"],
                       "psnr": metrics["metrics"]["psnr"], "world_size": metrics["world_size"], "history": metrics["history"]}
    both = min(r["psnr"] for r in runs.values())
    for row in runs.values():
        row["seconds_to_common_psnr"] = time_to(row.pop("history"), both - 0.05)
    speedup = runs["one_process"]["train_seconds"] / runs["torchrun"]["train_seconds"]
    result = {"image": str(args.fit), "steps": args.steps, "processes": args.processes, "cpu_count": os.cpu_count(), **runs,
              "common_psnr": both, "step_speedup": speedup, "efficiency": speedup / args.processes,
              "machine": machine(), "versions": versions()}
    report(f"kanimg fit {args.fit.name}, {args.steps} steps, 1 process vs torchrun × {args.processes} on {os.cpu_count()} CPUs, "
           f"time to {both - 0.05:.2f} dB", runs,
           "{steps_per_second:6.1f} steps/s  train {train_seconds:6.1f} s  wall {wall_seconds:6.1f} s  PSNR {psnr:.2f} dB  "
           "reached after {seconds_to_common_psnr} s", speedup, args.processes, "bench_scaling-fit.json", result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/bench-scaling"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--photos", type=int, default=4, help="how many of inr_bench's evaluation crops")
    parser.add_argument("--models", default="kan,rff")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--fit", type=Path, help="measure one data-parallel fit of this image instead of a comparison")
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.fit:
        return bench_fit(args, stamp)
    names = dict(list(EVAL.items())[: args.photos])
    photos = write_photos(args.out / "photos", names, crop=True)
    common = ["compare", str(photos), "--models", args.models, "--steps", str(args.steps), "-q"]
    runs = {}
    for label, launcher in launchers(args.processes).items():
        out = args.out / f"compare-{label}-{stamp}"
        runs[label] = summary(out, timed([*launcher, *common, "-o", str(out)]))
    speedup = runs["one_process"]["wall_seconds"] / runs["torchrun"]["wall_seconds"]
    result = {"processes": args.processes, "cpu_count": os.cpu_count(), "photos": list(names), "models": args.models.split(","),
              "steps": args.steps, **runs, "speedup": speedup, "efficiency": speedup / args.processes,
              "machine": machine(), "versions": versions()}
    report(f"{len(names)} photos × {args.models} at {args.steps} steps on {os.cpu_count()} CPUs", runs,
           "wall {wall_seconds:7.1f} s  {steps_per_wall_second:6.1f} steps/s  train {train_seconds:7.1f} s  "
           "mean PSNR {mean_psnr:.2f} dB  ranks {ranks}", speedup, args.processes, "bench_scaling.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
