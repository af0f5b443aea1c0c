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
    for label, launcher in (("one_process", [sys.executable, "-m", "kanimg"]),
                            ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          f"--nproc-per-node={args.processes}", "-m", "kanimg"])):
        out = args.out / f"fit-{label}-{stamp}"
        wall = timed([*launcher, *common, "-o", str(out)])
        metrics = json.loads((out / "metrics.json").read_text())
        runs[label] = {"wall_seconds": wall, "train_seconds": metrics["train_seconds"], "steps_per_second": metrics["steps_per_second"],
                       "psnr": metrics["metrics"]["psnr"], "world_size": metrics["world_size"], "history": metrics["history"]}
    both = min(r["psnr"] for r in runs.values())
    for row in runs.values():
        row["seconds_to_common_psnr"] = time_to(row.pop("history"), both - 0.05)
    one, many = runs["one_process"], runs["torchrun"]
    speedup = one["train_seconds"] / many["train_seconds"]
    result = {"image": str(args.fit), "steps": args.steps, "processes": args.processes, "cpu_count": os.cpu_count(), **runs,
              "common_psnr": both, "step_speedup": speedup, "efficiency": speedup / args.processes,
              "machine": machine(), "versions": versions()}
    print(f"kanimg fit {args.fit.name}, {args.steps} steps, 1 process vs torchrun × {args.processes} on {os.cpu_count()} CPUs")
    for label, row in (("1 process", one), (f"torchrun × {args.processes}", many)):
        reached = row["seconds_to_common_psnr"]
        print(f"  {label:14s} {row['steps_per_second']:6.1f} steps/s  train {row['train_seconds']:6.1f} s  wall {row['wall_seconds']:6.1f} s  "
              f"PSNR {row['psnr']:.2f} dB  {both - 0.05:.2f} dB after {reached if reached is None else round(reached, 1)} s")
    print(f"  step speed-up {speedup:.2f}×, efficiency {speedup / args.processes:.2f}")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "bench_scaling-fit.json", result)
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
    one_out, many_out = args.out / f"one-{stamp}", args.out / f"torchrun{args.processes}-{stamp}"
    one = summary(one_out, timed([sys.executable, "-m", "kanimg", *common, "-o", str(one_out)]))
    many = summary(many_out, timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc-per-node={args.processes}", "-m", "kanimg", *common, "-o", str(many_out)]))
    speedup = one["wall_seconds"] / many["wall_seconds"]
    result = {"processes": args.processes, "cpu_count": os.cpu_count(), "photos": list(names), "models": args.models.split(","),
              "steps": args.steps, "one_process": one, "torchrun": many, "speedup": speedup, "efficiency": speedup / args.processes,
              "machine": machine(), "versions": versions()}
    print(f"{len(names)} photos × {args.models} at {args.steps} steps on {os.cpu_count()} CPUs")
    for label, row in (("1 process", one), (f"torchrun × {args.processes}", many)):
        print(f"  {label:14s} wall {row['wall_seconds']:7.1f} s  {row['steps_per_wall_second']:6.1f} steps/s  "
              f"train {row['train_seconds']:7.1f} s  mean PSNR {row['mean_psnr']:.2f} dB  ranks {row['ranks']}")
    print(f"  speed-up {speedup:.2f}×, efficiency {speedup / args.processes:.2f}")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "bench_scaling.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
