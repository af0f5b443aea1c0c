"""What reads out a hash encoding best: the default KAN's one KAN layer against the hash grid's
ReLU MLP, a linear readout, a KAN without grid updates and a deeper KAN, at equal steps of
equal batches (each at its family's learning rate).

    python benchmarks/kan_heads.py -o runs/kan-heads                 # 300 steps on the tuning photos
    python benchmarks/kan_heads.py --steps 100 --photos coffee -o /tmp/heads

Every variant is a registered model with options (the encoding is the same: 16 levels × 2
features, 2^16 entries per level, finest level as fine as the image) and its settings pinned
(HEADS), trained on the photos
inr_bench.py tunes on (TUNE), so the benchmark's photos stay unseen. Prints a Markdown table
(PSNR and training seconds per photo) and writes JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import kanimg
from kanimg.files import write_json
from kanimg.results import machine, versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inr_bench import HASHGRID_TWO_HIDDEN, TUNE, write_photos  # noqa: E402

# label: (model, options, training options); C (the output width) follows the image's channels.
# Settings are pinned as the table in docs/benchmark.md ran them (2026-12-01), not read from
# today's family defaults: the hash grid's rate was 1e-2 then, and the KAN refitted its grids
# every 25 steps in the first 500.
ENCODING = {"log2_table_size": 16}
REFITS = {"grid_update_every": 25, "grid_update_until": 500}
HEADS = {
    "ReLU MLP [64, 64] (hashgrid@2-hidden)": ("hashgrid", {**ENCODING, "widths": HASHGRID_TWO_HIDDEN}, {"lr": 1e-2}),
    "linear": ("hashgrid", {**ENCODING, "widths": [2, 1]}, {"lr": 3e-2}),
    "one KAN layer, grid refits": ("kan", ENCODING, {"lr": 6e-2, **REFITS}),
    "one KAN layer, no grid updates (kan)": ("kan", ENCODING, {"lr": 6e-2, "grid_update_every": 0}),
    "KAN [16] hidden, grids 32, 8": ("kan", {**ENCODING, "widths": [2, 16, 1], "grids": [32, 8]}, {"lr": 6e-2, **REFITS}),
}
BATCH = 8192  # pixels per step for every readout (the families' defaults differ: 2,048 and 8,192)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--photos", default=",".join(TUNE), help="tuning photos, comma-separated")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/kan-heads"))
    parser.add_argument("--json", type=Path, help="results JSON (default: benchmarks/results/kan_heads.json)")
    args = parser.parse_args(argv)
    photos = write_photos(args.out / "photos", {name: TUNE[name] for name in args.photos.split(",")}, crop=True)
    records = []
    for label, (model, spec, train) in HEADS.items():
        for image in sorted(photos.glob("*.png")):
            result = kanimg.fit(image, model, steps=args.steps, eval_every=args.steps, batch_size=BATCH, progress=False, **spec, **train)
            records.append({"head": label, "model": model, "spec": spec, "train": train, "image": image.stem,
                            "psnr": result.metrics["psnr"], "seconds": result.trainer.train_seconds, "params": result.params})
            print(f"{label:34s} {image.stem:8s} {result.metrics['psnr']:6.2f} dB {result.trainer.train_seconds:6.1f} s",
                  file=sys.stderr, flush=True)
    images = sorted({r["image"] for r in records})
    lines = ["| readout of the hash encoding | mean PSNR (dB) | " + " | ".join(images) + " | mean training (s) |",
             "|---|---:|" + "---:|" * len(images) + "---:|"]
    for label in HEADS:
        rows = {r["image"]: r for r in records if r["head"] == label}
        lines.append(f"| {label} | {statistics.mean(r['psnr'] for r in rows.values()):.2f} | "
                     + " | ".join(f"{rows[i]['psnr']:.2f}" for i in images)
                     + f" | {statistics.mean(r['seconds'] for r in rows.values()):.1f} |")
    print("\n".join(lines))
    path = args.json or Path(__file__).resolve().parent / "results" / "kan_heads.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"steps": args.steps, "records": records, "table": lines,
                      "command": "python benchmarks/kan_heads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      "machine": machine(), "versions": versions()})
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
