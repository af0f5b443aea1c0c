"""How long the latent codec takes to code a file's grids (:func:`kanimg.compress.latent.code_latents`:
the search over depths, bucket counts, prediction codes and entropy models), and the bytes it
codes them in. Training codes the file every 200 steps and at the end, so this is part of every
encode.

Each file's grids are decoded once, then coded ``--repeats`` times; the median is reported.

    python benchmarks/grid_coding_speed.py runs/rd-fullcam runs/rd-fullmoto --repeats 3
    PYTHONPATH=/path/to/another/checkout python benchmarks/grid_coding_speed.py FILES --json other.json   # that kanimg's

Prints a Markdown table and writes JSON (default benchmarks/results/grid_coding_speed.json).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import kanimg
from kanimg.compress import latent
from kanimg.compress.bitstream import decode_model
from kanimg.compress.entropy import encode_streams
from kanimg.errors import KanimgError
from kanimg.files import write_json
from kanimg.results import machine, versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from context_bound import kimg_files  # noqa: E402


def coded_bytes(grids: list) -> tuple[int, float]:
    """(bytes of the grids as the file codes them: payload, one byte per model, two per stage;
    seconds the coding took)."""
    start = time.perf_counter()
    levels, streams, limits, models = latent.code_latents(grids)
    seconds = time.perf_counter() - start
    stages = sum(len(level.buckets) for level in levels)
    return len(encode_streams(streams, limits, models)) + len(models) * latent.MODEL_BITS // 8 + \
        stages * latent.STAGE_BITS // 8, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="latent .kimg files, or kanimg rd folders (their kimg/*-latent-*.kimg)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "grid_coding_speed.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    files = kimg_files(args.paths)
    if not files:
        parser.error("no latent .kimg files found")
    rows = []
    print("| file | grids | values | bytes | seconds (median) |\n|---|---:|---:|---:|---:|")
    try:
        for path in files:
            model = decode_model(path.read_bytes()).model
            if not hasattr(model, "integer_latents"):
                raise KanimgError(f"{path}: not a latent-grid file")
            grids = model.integer_latents()
            runs = [coded_bytes(grids) for _ in range(args.repeats)]
            row = {"file": str(path), "values": int(sum(g.size for g in grids)), "bytes": runs[0][0],
                   "seconds": [s for _, s in runs], "median_seconds": statistics.median(s for _, s in runs)}
            rows.append(row)
            print(f"| {path.name} | {len(grids)} | {row['values']:,} | {row['bytes']:,} | {row['median_seconds']:.3f} |", flush=True)
        write_json(args.json, {"kanimg": kanimg.__file__, "repeats": args.repeats, "machine": machine(),
                               "versions": versions(), "rows": rows})
    except (OSError, KanimgError) as error:
        print(f"grid_coding_speed: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
