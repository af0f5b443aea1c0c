"""What better context models could save on the latent codec's files, before building one:
each file's integer grids coded again (no retraining) three ways, in bits, against the
nested coder of .kimg version 5 that wrote them.

- ``predicted``: the nested coder, each set's values first predicted from the four neighbours
  that already set its context (residual v − round(α · their mean), α per set among ALPHAS,
  3 bits each in a header), the residuals under the same one-byte bucketed models: the
  prediction a format change could add.
- ``causal``: Cool-chic's kind of model, each grid in raster order under a discretised Laplace
  whose mean is a linear function of six causal neighbours (left, up, up-left, up-right, two
  left, two up) and whose log-scale is linear in their log-magnitudes, the 13 numbers fitted
  to the grid itself (an ideal no decoder gets for free; 8 bits each counted).

A grid coded all zeros by the file stays as the file codes it. Training is not redone, so a
model that training could learn to exploit may save more than this says (or less: training
has adapted its grids to the coder it has).

    kanimg rd runs/eval4 --models latent --codecs webp --bpp 0.3 -o runs/rd-eval4
    python benchmarks/context_bound.py runs/rd-eval4 photo.kimg --json runs/context-bound.json

Prints a Markdown table and writes JSON (default: benchmarks/results/context_bound.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from kanimg.compress import latent
from kanimg.compress.bitstream import decode_model
from kanimg.compress.entropy import cost_bits, fit_model
from kanimg.files import write_json
from kanimg.results import machine, versions

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ALPHA_BITS = 3
CAUSAL_OFFSETS = ((0, -1), (-1, 0), (-1, -1), (-1, 1), (0, -2), (-2, 0))
CAUSAL_PARAMETERS, PARAMETER_BITS = 1 + 2 * len(CAUSAL_OFFSETS), 8
PROBABILITY_FLOOR = 1e-9  # as the training's rate (latent.BITS_FLOOR)


def neighbour_means(grid: np.ndarray, mask: np.ndarray, diagonal: bool) -> np.ndarray:
    """The mean of each masked value's four diagonal (or direct) neighbours, 0 beyond the border."""
    return latent._neighbour_sums(grid, diagonal)[mask] / 4


def nested_bits(grid: np.ndarray, predict: bool) -> float:
    """Bits of ``grid`` under the nested coder (:func:`latent.code_grid`'s search over depths and
    bucket counts), its sets' values predicted first where ``predict``."""
    grid = np.asarray(grid, dtype=np.int64)
    limit = max(1, int(np.abs(grid).max(initial=0)))
    options, spent, current = [], 0.0, grid
    for depth in range(latent.MAX_DEPTH + 1):
        options.append(spent + cost_bits(current, fit_model(current, limit, compact=True), limit) + latent.MODEL_BITS)
        if current.size <= 1 or depth == latent.MAX_DEPTH:
            break
        for mask, diagonal in zip(latent.stage_sets(current.shape), (True, False)):
            values, sums = current[mask], latent._stage_contexts(current, mask, diagonal)
            best = latent._best_buckets(values, sums, limit)[0]
            if predict:
                means = neighbour_means(current, mask, diagonal)
                for alpha in ALPHAS[1:]:
                    residual = values - np.round(alpha * means).astype(np.int64)
                    reach = max(1, int(np.abs(residual).max(initial=0)))
                    best = min(best, latent._best_buckets(residual, sums, reach)[0] + ALPHA_BITS)
            spent += best
        spent += latent.STAGE_BITS
        current = current[::2, ::2]
    return min(options)


def causal_neighbours(grid: np.ndarray) -> np.ndarray:
    """(values, 6) the causal neighbours of every value in raster order, 0 beyond the border."""
    rows, cols = grid.shape
    padded = np.pad(grid.astype(np.float64), 2)
    return np.stack([padded[2 + dr : 2 + dr + rows, 2 + dc : 2 + dc + cols].reshape(-1) for dr, dc in CAUSAL_OFFSETS], 1)


def causal_bits(grid: np.ndarray) -> float:
    """Bits of ``grid`` under the causal Laplace model fitted to it (see above), parameters counted."""
    values = torch.from_numpy(np.asarray(grid, dtype=np.float64).reshape(-1))
    neighbours = torch.from_numpy(causal_neighbours(np.asarray(grid)))
    magnitudes = torch.log(1 + neighbours.abs())
    weights = torch.zeros(len(CAUSAL_OFFSETS), dtype=torch.float64, requires_grad=True)
    slopes = torch.zeros(len(CAUSAL_OFFSETS), dtype=torch.float64, requires_grad=True)
    offset = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def bits() -> torch.Tensor:
        centred = values - neighbours @ weights
        scale = torch.exp(offset + magnitudes @ slopes)
        cdf = lambda x: 0.5 + 0.5 * torch.sign(x) * (1 - torch.exp(-x.abs() / scale))  # noqa: E731
        return -torch.log2((cdf(centred + 0.5) - cdf(centred - 0.5)).clamp_min(PROBABILITY_FLOOR)).sum()

    optimiser = torch.optim.LBFGS([weights, slopes, offset], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = bits()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return float(bits()) + CAUSAL_PARAMETERS * PARAMETER_BITS


def file_record(path: Path) -> dict:
    """Per grid and in all: the bits of each way of coding the file's grids."""
    data = path.read_bytes()
    grids = decode_model(data).model.integer_latents()
    rows = []
    for k, grid in enumerate(grids):
        nested = nested_bits(grid, predict=False)
        coded = bool(grid.any())
        rows.append({"grid": k, "shape": list(grid.shape), "nonzero": float(np.mean(grid != 0)), "nested": nested,
                     "predicted": nested_bits(grid, predict=True) if coded else nested,
                     "causal": causal_bits(grid) if coded else nested})
    totals = {way: sum(r[way] for r in rows) for way in ("nested", "predicted", "causal")}
    return {"file": str(path), "bytes": len(data), "grids": rows, **totals}


def kimg_files(paths: list[Path]) -> list[Path]:
    """The .kimg files named, and the latent codec's files of rd folders."""
    found = []
    for path in paths:
        found += sorted((path / "kimg").glob("*-latent-*.kimg")) if path.is_dir() else [path]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help=".kimg files of the latent codec, or kanimg rd folders")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "context_bound.json")
    args = parser.parse_args(argv)
    files = kimg_files(args.paths)
    if missing := [str(f) for f in files if not f.is_file()]:
        parser.error(f"no such file: {', '.join(missing)}")
    if not files:
        parser.error("no latent .kimg files found")
    records = []
    print("| file | bytes | grids' bits (nested, as coded) | predicted | causal (ideal) |\n|---|---:|---:|---:|---:|")
    for path in files:
        r = file_record(path)
        records.append(r)
        share = lambda way: f"{r[way]:,.0f} ({100 * (r[way] / r['nested'] - 1):+.1f} %)"  # noqa: E731
        print(f"| {path.name} | {r['bytes']:,} | {r['nested']:,.0f} | {share('predicted')} | {share('causal')} |", flush=True)
    try:
        write_json(args.json, {"machine": machine(), "versions": versions(), "alphas": list(ALPHAS), "records": records})
    except OSError as error:
        print(f"context_bound: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
