"""The KAN paper's image-fitting table next to a measured `kanimg compare --preset paper` run.

    kanimg compare cameraman.jpg --preset paper -o runs/paper
    python benchmarks/paper_table.py runs/paper          # prints Markdown, writes JSON

Reads every model's run folder (runs/<image>/<model>/metrics.json), so a comparison that is
still going, or was interrupted, gives a partial table; unfinished runs are marked.

Paper numbers: arXiv 2410.01803 via the KAN slides (PSNR in dB on the 0–255 scale; training
times in seconds on the authors' GPU, only given for some models).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from kanimg.comparison import run_record

PAPER = {  # model: (PSNR dB, training seconds or None)
    "kan2": (45.76, 1809), "siren1": (27.34, 254), "siren2": (30.79, 407), "mlp1": (20.76, None),
    "mlp2": (22.09, 182), "rff1-s3": (22.17, None), "rff1-s30": (23.92, None), "rff2-s3": (24.73, None),
    "rff2-s30": (26.26, 195),
}


def table(records: list[dict]) -> str:
    lines = ["| model | params | paper PSNR (dB) | measured PSNR (dB) | measured − paper | paper time (s, GPU) | measured time (s) | steps | steps/s | device |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        paper_psnr, paper_time = PAPER.get(r["model"], (None, None))
        diff = f"{r['psnr'] - paper_psnr:+.2f}" if paper_psnr is not None else "n/a"
        lines.append(f"| {r['model']} | {r['params']:,} | {paper_psnr if paper_psnr is not None else 'n/a'} | {r['psnr']:.2f} | {diff} | "
                     f"{paper_time if paper_time is not None else 'n/a'} | {r['seconds']:.0f} | {r['steps']:,}{'' if r['finished'] else ' (unfinished)'} | "
                     f"{r['steps_per_second']:.1f} | {r['device']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="output folder of kanimg compare --preset paper")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/paper_table.json"))
    args = p.parse_args(argv)
    records = [run_record(path.parent, args.run) for path in sorted(args.run.glob("runs/*/*/compare-request.json"))]
    records.sort(key=lambda r: list(PAPER).index(r["model"]) if r["model"] in PAPER else len(PAPER))
    if not records:
        raise SystemExit(f"{args.run}: no finished or interrupted runs under runs/*/*/")
    print(table(records))
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, total training time {sum(r['seconds'] for r in records) / 60:.0f} min")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"paper": PAPER, "measured": records}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
