"""Training-step speed and backward memory of kanimg's KAN layer against its baselines.

One step = forward + MSE + backward + Adam on a random batch of coordinates. Variants, all
measured in the same run and interleaved round by round so machine noise hits them alike:

  fast        kanimg's KAN (packed matmul + custom backward, fused CPU kernel where built)
  fast-torch  the same layer with the pure-PyTorch feature functions (the CUDA path)
  percentile  "fast" on pykan-style percentile knots (binary search + local de Boor basis)
  reference   Cox–de Boor dense basis + autograd (efficient-kan style), the tests' oracle
  mlp         ReLU MLP [2, 404, 404, 404, 404, 1]
  floor       only the matmuls the packed formulation needs: per layer F@W, Fᵀ@dY, dY@Wᵀ

Saved-for-backward memory is measured with torch.autograd.graph.saved_tensors_hooks at two
batch sizes; the slope is the per-sample cost (parameter-sized tensors cancel out).

    python benchmarks/bench_kan.py                    # the paper's network, batch 4096, 2 threads
    python benchmarks/bench_kan.py --device cuda      # adds TF32 and torch.compile variants
    python benchmarks/bench_kan.py --device cuda --psnr-steps 2000   # … and what each costs in PSNR

With --psnr-steps N, each fast variant (plain, TF32, torch.compile) also fits the bundled
photograph for N steps with the same seed, and the best full-image PSNR is reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from kanimg.nn import KAN, MLP
from kanimg.nn.kernel import cpu_kernel


class ReferenceKAN(nn.Module):
    """Runs a KAN's layers through their Cox–de Boor reference forward."""

    def __init__(self, kan: KAN) -> None:
        super().__init__()
        self.kan = kan

    def forward(self, x):
        for layer in self.kan.layers:
            x = layer.reference_forward(x)
        return x


def make_step(model: nn.Module, batch: int, device: torch.device):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 2, device=device) * 2 - 1
    y = torch.rand(batch, 1, device=device)

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
            loss = torch.nn.functional.mse_loss(model(x), torch.zeros(b, 1, device=device))
        del loss
        totals.append(sum(seen.values()))
    return (totals[1] - totals[0]) / (batches[1] - batches[0])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="2,128,128,128,128,1")
    p.add_argument("--grids", default="100,10,10,10,10")
    p.add_argument("--mlp-width", type=int, default=404)
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
        return KAN(widths, grids).to(device)

    def percentile_kan():  # knots at the quantiles of the activations after one grid update
        model = KAN(widths, grids, grid_kind="percentile").to(device)
        with torch.no_grad():
            model.update_grids(torch.rand(args.batch, widths[0], device=device) * 2 - 1)
        return model

    no_kernel = mock.patch("kanimg.nn.kan.cpu_kernel", lambda: None)
    variants: dict[str, tuple] = {  # name -> (model or None, step fn, context for the step)
        "fast": (m := kan(), make_step(m, args.batch, device), nullcontext),
        "fast-torch": (m := kan(), make_step(m, args.batch, device), lambda: no_kernel),
        "percentile": (m := percentile_kan(), make_step(m, args.batch, device), nullcontext),
        "reference": (m := ReferenceKAN(kan()), make_step(m, args.batch, device), nullcontext),
        "mlp": (m := MLP([2] + [args.mlp_width] * (len(widths) - 2) + [1]).to(device), make_step(m, args.batch, device), nullcontext),
        "floor": (None, floor_step(widths, grids, args.batch, device), nullcontext),
    }
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        variants.pop("fast-torch")  # on CUDA "fast" already is the PyTorch path
        compiled = torch.compile(kan())
        variants["fast-compile"] = (compiled, make_step(compiled, args.batch, device), nullcontext)
        tf32 = kan()
        variants["fast-tf32"] = (tf32, make_step(tf32, args.batch, device), lambda: _tf32())
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
    print(f"device={device} threads={args.threads} batch={args.batch} widths={widths} grids={grids}")
    print(f"{'variant':<13}{'ms/step':>9}{'samples/s':>12}{'saved B/sample':>16}{'x floor':>9}{'x mlp':>8}")
    for name, (model, _, ctx) in variants.items():
        with ctx():
            saved = saved_bytes_per_sample(model, device) if model is not None else None
        row = {
            "variant": name,
            "ms_per_step": round(ms[name], 2),
            "samples_per_s": round(args.batch / ms[name] * 1000),
            "saved_bytes_per_sample": None if saved is None else round(saved),
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
        "kernel": device.type == "cpu" and cpu_kernel() is not None, "results": results,
    }, indent=2))
    print(f"wrote {out}")
    return 0


def fit_psnr(variant: str, steps: int, device: torch.device) -> float:
    """Best full-image PSNR of the default KAN on the bundled photograph after ``steps`` steps."""
    from kanimg.fit import default_image, model_spec_for, train_config_for
    from kanimg.io import load_image
    from kanimg.models import build_model
    from kanimg.sampling import ImageTarget
    from kanimg.train import Trainer

    data = load_image(default_image())
    torch.manual_seed(0)
    model = build_model("kan", **model_spec_for("kan", {}, data.channels, (data.height, data.width))).to(device)
    config = train_config_for("kan", {"steps": steps, "eval_every": max(1, steps // 4)})
    if variant == "fast-compile":
        spec = model.spec
        model = torch.compile(model)
        model.spec = spec
    context = _tf32() if variant == "fast-tf32" else (mock.patch("kanimg.nn.kan.cpu_kernel", lambda: None) if variant == "fast-torch" else nullcontext())
    with context:
        trainer = Trainer(model, ImageTarget(data.pixels, device=device), config, progress=False)
        trainer.train()
    return trainer.best_psnr


class _tf32:
    def __enter__(self):
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = False


if __name__ == "__main__":
    raise SystemExit(main())
