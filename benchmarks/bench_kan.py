"""Training-step speed and backward memory of kanimg's KAN layer against its baselines.

One step = forward + MSE + backward + Adam on a random batch of coordinates. Variants, all
measured in the same run and interleaved round by round so machine noise hits them alike:

  fast           kanimg's KAN (packed matmul, fused kernel: C++ on CPU, Triton on CUDA)
  fast-torch     the same layer on the pure-PyTorch path (KANIMG_NO_KERNEL=1)
  fast-compile   "fast" through torch.compile(fullgraph=True) (the kernel stays one opaque op)
  torch-compile  "fast-torch" through torch.compile (Inductor fuses the PyTorch path)
  percentile     "fast" on pykan-style percentile knots (binary search + local de Boor basis)
  reference      Cox–de Boor dense basis + autograd (efficient-kan style), the tests' oracle
  mlp            ReLU MLP with as many hidden layers and about as many parameters as the KAN
  floor          only the matmuls the packed formulation needs: per layer F@W, Fᵀ@dY, dY@Wᵀ
  CUDA only: fast-tf32 (TF32 matmuls), fast-bf16 and mlp-bf16 (bf16 autocast)

Saved-for-backward memory is measured with torch.autograd.graph.saved_tensors_hooks at two
batch sizes; the slope is the per-sample cost (parameter-sized tensors cancel out).

    python benchmarks/bench_kan.py                    # the paper's network, batch 4096, 2 threads
    python benchmarks/bench_kan.py --device cuda      # adds TF32 and bf16 variants
    python benchmarks/bench_kan.py --device cuda --psnr-steps 2000   # … and what each costs in PSNR

With --psnr-steps N, each fast variant (fused, PyTorch path, compiled, TF32, bf16) also fits the
bundled photograph for N steps with the same seed, and the best full-image PSNR is reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import math
import os
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from kanimg.nn import KAN, MLP
from kanimg.nn.kernel import cpu_kernel
from kanimg.nn.packed_spline import fused_path


class ReferenceKAN(nn.Module):
    """Runs a KAN's layers through their Cox–de Boor reference forward."""

    def __init__(self, kan: KAN) -> None:
        super().__init__()
        self.kan = kan

    def forward(self, x):
        x = self.kan.lift(x)
        for layer in self.kan.layers:
            x = layer.reference_forward(x)
        return x


def make_step(model: nn.Module, batch: int, device: torch.device, outputs: int):
    """One training step on a fixed random batch (the model is not called here: a compiled
    model traces on its first call, which must happen inside the variant's context)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 2, device=device) * 2 - 1
    y = torch.rand(batch, outputs, device=device)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def floor_step(widths, grids, batch: int, device: torch.device):
    """The three matmuls per layer of the packed formulation, on random operands."""
    mats = []
    for a, b, g in zip(widths[:-1], widths[1:], grids):
        k = a * (g + 3) + a
        mats.append((torch.randn(batch, k, device=device), torch.randn(k, b, device=device), torch.randn(batch, b, device=device)))

    def step() -> None:
        for f, w, dy in mats:
            f @ w
            f.t() @ dy
            dy @ w.t()

    return step


def saved_bytes_per_sample(model: nn.Module, device: torch.device, batches=(1024, 2048)) -> float:
    totals = []
    for b in batches:
        seen: dict[tuple, int] = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
            return t

        x = torch.rand(b, 2, device=device) * 2 - 1
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
            loss = torch.nn.functional.mse_loss(out, torch.zeros_like(out))
        del loss
        totals.append(sum(seen.values()))
    return (totals[1] - totals[0]) / (batches[1] - batches[0])


def peak_bytes_per_sample(model: nn.Module, device: torch.device, batches=(8192, 16384)) -> float | None:
    """CUDA only: growth of the peak memory of a forward + backward per sample (parameter-sized
    allocations cancel out between the two batch sizes)."""
    if device.type != "cuda":
        return None
    peaks = []
    for b in batches:
        x = torch.rand(b, 2, device=device) * 2 - 1
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = model(x)
        torch.nn.functional.mse_loss(out, torch.zeros_like(out)).backward()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        model.zero_grad(set_to_none=True)
    return (peaks[1] - peaks[0]) / (batches[1] - batches[0])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="2,128,128,128,128,1")
    p.add_argument("--grids", default="100,10,10,10,10")
    p.add_argument("--mlp-width", type=int, default=0, help="hidden width of the MLP (default: its parameters match the KAN's)")
    p.add_argument("--directions", type=int, default=0, help="ridge directions of the first layer (0: x and y, as the paper)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip", default="", help="comma-separated variants to leave out")
    p.add_argument("--psnr-steps", type=int, default=0, help="also fit the bundled image this many steps per fast variant")
    p.add_argument("--json", default="benchmarks/results/bench_kan.json")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    widths = [int(v) for v in args.widths.split(",")]
    grids = [int(v) for v in args.grids.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    if device.type == "cpu":
        cpu_kernel()  # compile before timing

    def kan():
        return KAN(widths, grids, directions=args.directions).to(device)

    def percentile_kan():  # knots at the quantiles of the activations after one grid update
        model = KAN(widths, grids, grid_kind="percentile", directions=args.directions).to(device)
        with torch.no_grad():
            model.update_grids(torch.rand(args.batch, widths[0], device=device) * 2 - 1)
        return model

    hidden = len(widths) - 2
    mlp_width = args.mlp_width or equal_params_width(sum(p.numel() for p in kan().parameters()), hidden, widths[0], widths[-1])

    def mlp():
        return MLP([widths[0]] + [mlp_width] * hidden + [widths[-1]]).to(device)

    def compiled(model):
        # Each compiled variant gets its own subclass: Dynamo's cache is per code object, and
        # without a guard that tells them apart the second variant would reuse the first's
        # graph (its kernel choice is a compile-time constant).
        model.__class__ = type(f"{type(model).__name__}_{len(variants_compiled)}", (type(model),), {})
        variants_compiled.append(model)
        return torch.compile(model, fullgraph=True)

    variants_compiled: list = []

    variants: dict[str, tuple] = {  # name -> (model or None, step fn, context for the step)
        "fast": (m := kan(), make_step(m, args.batch, device, widths[-1]), nullcontext),
        "fast-torch": (m := kan(), make_step(m, args.batch, device, widths[-1]), _pytorch_path),
        "fast-compile": (m := compiled(kan()), make_step(m, args.batch, device, widths[-1]), nullcontext),
        "torch-compile": (m := compiled(kan()), make_step(m, args.batch, device, widths[-1]), _pytorch_path),
        "percentile": (m := percentile_kan(), make_step(m, args.batch, device, widths[-1]), nullcontext),
        "reference": (m := ReferenceKAN(kan()), make_step(m, args.batch, device, widths[-1]), nullcontext),
        "mlp": (m := mlp(), make_step(m, args.batch, device, widths[-1]), nullcontext),
        "floor": (None, floor_step([args.directions or widths[0]] + widths[1:], grids, args.batch, device), nullcontext),
    }
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        variants["fast-tf32"] = (m := kan(), make_step(m, args.batch, device, widths[-1]), _tf32)
        variants["fast-bf16"] = (m := kan(), make_step(m, args.batch, device, widths[-1]), _bf16)
        variants["mlp-bf16"] = (m := mlp(), make_step(m, args.batch, device, widths[-1]), _bf16)
    for name in skip:
        variants.pop(name, None)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, (_, step, ctx) in variants.items():  # warm-up (and compile)
        with ctx():
            for _ in range(2):
                step()
    for _ in range(args.rounds):
        for name, (_, step, ctx) in variants.items():
            with ctx():
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                times[name].append(time.perf_counter() - t0)

    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    floor = ms.get("floor")
    results = []
    print(f"device={device} threads={args.threads} batch={args.batch} widths={widths} grids={grids} mlp width={mlp_width}")
    print(f"{'variant':<13}{'ms/step':>9}{'samples/s':>12}{'saved B/sample':>16}{'x floor':>9}{'x mlp':>8}")
    for name, (model, _, ctx) in variants.items():
        with ctx():
            try:
                saved = saved_bytes_per_sample(model, device) if model is not None else None
            except Exception:  # e.g. a compiled graph that saved-tensor hooks cannot see into
                saved = None
            peak = peak_bytes_per_sample(model, device) if model is not None else None
        row = {
            "variant": name,
            "ms_per_step": round(ms[name], 2),
            "samples_per_s": round(args.batch / ms[name] * 1000),
            "saved_bytes_per_sample": None if saved is None else round(saved),
            "peak_bytes_per_sample": None if peak is None else round(peak),
            "ratio_to_floor": None if floor is None else round(ms[name] / floor, 3),
            "ratio_to_mlp": round(ms[name] / ms["mlp"], 3) if "mlp" in ms else None,
        }
        results.append(row)
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{name:<13}{row['ms_per_step']:>9.1f}{row['samples_per_s']:>12}{fmt(row['saved_bytes_per_sample'], 'd'):>16}"
              f"{fmt(row['ratio_to_floor'], '.2f'):>9}{fmt(row['ratio_to_mlp'], '.2f'):>8}")
    if "reference" in ms and "fast" in ms:
        print(f"fast is {ms['reference'] / ms['fast']:.1f}x faster than the reference")
    if args.psnr_steps:
        for row in results:
            if row["variant"].startswith("fast"):
                row["psnr"] = round(fit_psnr(row["variant"], args.psnr_steps, device), 2)
                print(f"{row['variant']:<13} PSNR after {args.psnr_steps} steps: {row['psnr']:.2f} dB")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": vars(args), "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "kernel": fused_path(device.type, torch.float32), "mlp_width": mlp_width, "results": results,
    }, indent=2))
    print(f"wrote {out}")
    return 0


def fit_psnr(variant: str, steps: int, device: torch.device) -> float:
    """Best full-image PSNR of the default KAN on the bundled photograph after ``steps`` steps."""
    from kanimg.fitting import model_spec_for, train_config_for
    from kanimg.io import default_image, load_image
    from kanimg.models import build_model
    from kanimg.sampling import ImageTarget
    from kanimg.train import Trainer

    data = load_image(default_image())
    torch.manual_seed(0)
    model = build_model("kan", **model_spec_for("kan", {}, data.channels, (data.height, data.width))).to(device)
    config = train_config_for("kan", {"steps": steps, "eval_every": max(1, steps // 4)})
    config.compile = variant.endswith("compile")
    config.precision = {"fast-tf32": "tf32", "fast-bf16": "bf16"}.get(variant, "fp32")
    with _pytorch_path() if variant in ("fast-torch", "torch-compile") else nullcontext():
        trainer = Trainer(model, ImageTarget(data.pixels, device=device), config, progress=False)
        trainer.train()
    return trainer.best_psnr


def equal_params_width(params: int, hidden: int, n_in: int, n_out: int) -> int:
    """Hidden width w of a ReLU MLP with ``hidden`` layers whose parameter count is closest to ``params``:
    (hidden - 1)·w² + (n_in + n_out + hidden)·w + n_out = params."""
    a, b, c = hidden - 1, n_in + n_out + hidden, n_out - params
    return round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)) if a else round(-c / b)


def _pytorch_path():
    return mock.patch.dict(os.environ, {"KANIMG_NO_KERNEL": "1"})


class _tf32:
    def __enter__(self):
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = False


def _bf16():
    return torch.autocast("cuda", dtype=torch.bfloat16)


if __name__ == "__main__":
    raise SystemExit(main())
