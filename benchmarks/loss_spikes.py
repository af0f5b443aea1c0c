"""Loss spikes in finished runs: where a run's batch loss jumps far above the lowest it had reached.

The KAN's camera crop scored less at 120 s than at 30 s (docs/benchmark.md). Its training
curve shows why: while the learning rate is high its batch loss jumps a thousandfold and more,
once above where training started, while the hash grid's never does. This reads the curves every
run already writes (metrics.json: the batch loss every 10 steps, the full-image PSNR at each
evaluation), so any benchmark's runs can be checked without training anything:

    python benchmarks/loss_spikes.py runs/inr-120-kan runs/inr-120-hg

A spike is a logged batch loss SPIKE_FACTOR times the lowest logged before it, past the first
SETTLE_STEPS steps. Per run: the spikes, the worst, the best evaluation before it and the
lowest after it, and the best evaluation (the weights a run keeps) and the last. Prints a
Markdown table per model and budget and writes JSON (default: benchmarks/results/loss_spikes.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kanimg.files import write_json
from kanimg.results import fmt, machine, markdown_table, versions

SPIKE_FACTOR = 1000.0
SETTLE_STEPS = 300  # the first descent, from the initial loss, is not a spike


def spikes(steps: list[int], losses: list[float]) -> list[tuple[int, float]]:
    """(step, loss) of every logged loss SPIKE_FACTOR × the lowest logged before it."""
    lowest, found = float("inf"), []
    for step, loss in zip(steps, losses):
        if step > SETTLE_STEPS and loss > SPIKE_FACTOR * lowest:
            found.append((step, loss))
        lowest = min(lowest, loss)
    return found


def run_record(path: Path) -> dict | None:
    """One run's spikes and evaluations, from its metrics.json (None if it logged no curve)."""
    metrics = json.loads(path.read_text())
    history = metrics.get("history") or {}
    if not history.get("step"):
        return None
    found = spikes(history["step"], history["loss"])
    evals = list(zip(history.get("eval_step", []), history.get("eval_psnr", [])))  # (step, PSNR)
    best = max(evals, key=lambda e: e[1], default=(None, None))
    # what the worst spike cost: the best evaluation before it and the lowest after it
    worst_step, worst_loss = max(found, key=lambda f: f[1], default=(None, None))
    before = [psnr for step, psnr in evals if found and step < worst_step]
    after = [psnr for step, psnr in evals if found and step >= worst_step]
    return {"run": str(path.parent), "model": metrics["model"]["name"], "image": Path(metrics["image"]).stem,
            "seed": metrics.get("seed"), "budget": metrics["config"]["train"].get("budget_seconds"),
            "steps": metrics["steps_done"], "spikes": len(found), "first_spike_step": found[0][0] if found else None,
            "worst_loss": worst_loss, "worst_spike_step": worst_step, "lowest_loss": min(history["loss"]),
            "best_eval_before_worst": max(before, default=None), "lowest_eval_after_worst": min(after, default=None),
            "best_eval_psnr": best[1], "best_eval_step": best[0], "last_eval_psnr": evals[-1][1] if evals else None}


def scan(folders: list[Path]) -> list[dict]:
    """Every run (a folder with metrics.json) under the folders; ValueError names a file that is not one."""
    records = []
    for folder in folders:
        for path in sorted(folder.rglob("metrics.json")):
            try:
                record = run_record(path)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:  # ValueError: bad JSON or text
                raise ValueError(f"{path} is not a kanimg run's metrics.json ({type(error).__name__}: {error})") from None
            if record is not None:
                records.append(record)
    return records


def markdown(records: list[dict]) -> str:
    """Per model and budget: how many runs spiked, then the runs that did."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["model"], record["budget"]), []).append(record)
    rows = []
    for (model, budget), group in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        hit = [r for r in group if r["spikes"]]
        rows.append([model, fmt(budget, "{:g}"), str(len(group)), str(len(hit)), str(sum(r["spikes"] for r in group)),
                     fmt(max((r["worst_loss"] for r in hit), default=None), "{:.2e}"), "", ""])
        rows += [[f"↳ {r['image']}, seed {r['seed']}", "", "", "", str(r["spikes"]), f"{r['worst_loss']:.2e} ({r['worst_spike_step']})",
                  f"{fmt(r['best_eval_before_worst'], '{:.2f}')} → {fmt(r['lowest_eval_after_worst'], '{:.2f}')}",
                  f"{fmt(r['best_eval_psnr'], '{:.2f}')} ({r['best_eval_step']})"] for r in hit]
    return markdown_table(["model", "budget (s)", "runs", "runs with spikes", "spikes", "worst loss (step)",
                           "evaluation before → lowest after the worst (dB)", "best evaluation (dB, step)"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding runs (each with a metrics.json)")
    parser.add_argument("--json", type=Path, help="results JSON (default: benchmarks/results/loss_spikes.json)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        records = scan(args.folders)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: no run with a training curve (metrics.json) under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 2
    print(markdown(records))
    path = args.json or Path(__file__).resolve().parent / "results" / "loss_spikes.json"
    try:
        write_json(path, {"records": records, "spike_factor": SPIKE_FACTOR, "settle_steps": SETTLE_STEPS,
                          "command": "python " + " ".join(sys.argv), "machine": machine(), "versions": versions()})
    except OSError as error:
        print(f"error: cannot write {path}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
