"""What an RD experiment writes: results.json (CompressAI-like), results.md, the RD plot(s)
and the networks' .kimg bitstreams, all built in a staging folder and moved into place."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..export import write_json
from ..files import RunFolder, atomic_path, atomic_write_bytes
from .codecs import NEURAL
from .rd import REFERENCE, PointCache, RDConfig, RDResult, run_rd, summarise

MARKERS = {"kan": "o", "siren": "s", "jpeg": "^", "webp": "v", "avif": "D"}


def rd_to_folder(path: Path, out: Path, config: RDConfig, force: bool = False, progress: bool = True,
                 command: str | None = None) -> dict[str, Any]:
    """Run the experiment on ``path`` (image or folder) and write every output into ``out``.

    The folder is checked before any work (an existing one needs ``force``) and appears only
    when everything is written. Every finished network point is kept at once in the staging
    folder (``.NAME.partial/points``), so the same command after Ctrl-C or a kill continues
    where it stopped. Returns the results.json payload.
    """
    with RunFolder(Path(out), "rd", replace=force) as staging:
        result = run_rd(Path(path), config, progress=progress, cache=PointCache(staging / "points"))
        summary = summarise(result)
        if command:
            summary["command"] = command
        write_report(result, summary, staging)
        shutil.rmtree(staging / "points", ignore_errors=True)  # the finished folder has every point in results.json and kimg/
    return summary


def write_report(result: RDResult, summary: dict[str, Any], folder: Path) -> None:
    write_json(folder / "results.json", summary)
    with atomic_path(folder / "results.md") as tmp:
        Path(tmp).write_text(markdown(summary), encoding="utf-8")
    names = list(summary["codecs"])
    title = ", ".join(i["name"] for i in summary["images"])
    mean = {n: summary["codecs"][n]["results"] for n in names}
    plot_rd(folder / "rd.png", mean, f"{title}" + (" (mean)" if len(summary["images"]) > 1 else ""), summary["bpp_targets"])
    if len(summary["images"]) > 1:
        for img in summary["images"]:
            curves = {n: summary["codecs"][n]["per_image"][img["name"]]["results"] for n in names}
            plot_rd(folder / f"rd-{_safe(img['name'])}.png", curves, img["name"], summary["bpp_targets"])
    streams = folder / "kimg"
    for img in result.images:
        for name, blobs in img.bitstreams.items():
            for point, blob in zip(img.points[name], blobs):
                streams.mkdir(exist_ok=True)
                atomic_write_bytes(streams / f"{_safe(img.name)}-{name}-{point.setting.split()[1]}bpp.kimg", blob)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plot_rd(path: Path, curves: dict[str, dict], title: str, targets: Sequence[float]) -> None:
    """PSNR against bpp, one curve per codec (matplotlib object API, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    top = max(targets) * 1.15
    for name, curve in curves.items():
        pairs = sorted((b, p) for b, p in zip(curve["bpp"], curve["psnr"]) if b <= top)
        if pairs:
            ax.plot([b for b, _ in pairs], [p for _, p in pairs], marker=MARKERS.get(name, "."), ms=4, lw=1.4, label=name)
    for target in targets:
        ax.axvline(target, color="0.85", lw=0.8, zorder=0)
    ax.set(xlabel="bits per pixel (file size × 8 / pixels)", ylabel="PSNR (dB, decoded 8-bit image)", title=title, xlim=(0, top))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ----------------------------------------------------------------------------- Markdown
def _fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    targets = summary["bpp_targets"]
    codecs = summary["codecs"]
    images = summary["images"]
    lines = ["# Rate–distortion results", ""]
    lines.append("Images: " + ", ".join(f"{i['name']} ({i['width']}×{i['height']}, {i['channels']} ch)" for i in images) + ".")
    m = summary["machine"]
    lines.append(f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {summary['versions']['torch']} "
                 f"({m['torch_threads']} threads), Pillow {summary['versions']['pillow']}.")
    if summary.get("command"):
        lines += ["", f"Command: `{summary['command']}`"]
    lines += ["", "## PSNR at the target bit rates" + (" (mean over images)" if len(images) > 1 else ""), "",
              "Classic codecs: PSNR interpolated at the target bpp (monotone cubic in log-rate; — = outside the "
              "qualities' range). Networks: the file fitted for the target, with the bpp it reached in brackets. "
              f"BD metrics against {REFERENCE.upper()} over the common range of the mean curves (— = fewer than 4 points or no overlap).", ""]
    header = "| codec | " + " | ".join(f"{t:g} bpp" for t in targets) + " | BD-rate vs JPEG | BD-PSNR vs JPEG |"
    lines += [header, "|" + "---|" * (len(targets) + 3)]
    for name, entry in codecs.items():
        if name in NEURAL:
            res = entry["results"]
            cells = [f"{p:.2f} ({b:.3f})" for b, p in zip(res["bpp"], res["psnr"])]
        else:
            cells = [_fmt(v) for v in entry["at_target"]["psnr"]]
        bd = entry.get("bd_vs_jpeg")
        bd_cells = ["reference", ""] if name == REFERENCE else (
            [_fmt(bd["bd_rate_percent"], 1, True) + (" %" if bd["bd_rate_percent"] is not None else ""),
             _fmt(bd["bd_psnr_db"], 2, True) + (" dB" if bd["bd_psnr_db"] is not None else "")] if bd else ["—", "—"])
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(bd_cells) + " |")
    others = [n for n in codecs]
    if summary["comparisons"]:
        lines += ["", "## Networks against every codec at the same bpp", "",
                  "Each network file against the other codecs' PSNR interpolated at exactly its bpp (difference in brackets: "
                  "positive = the network is better).", "",
                  "| image | codec | bpp | PSNR | " + " | ".join(others) + " |", "|" + "---|" * (4 + len(others))]
        for row in summary["comparisons"]:
            cells = []
            for other in others:
                if other == row["codec"]:
                    cells.append("")
                else:
                    v, d = row["others"].get(other), row["delta"].get(other)
                    cells.append("—" if v is None else f"{v:.2f} ({d:+.2f})")
            lines.append(f"| {row['image']} | {row['codec']} | {row['bpp']:.3f} | {row['psnr']:.2f} | " + " | ".join(cells) + " |")
    neural = [n for n in codecs if n in NEURAL]
    if neural:
        lines += ["", "## Networks: PSNR before and after quantisation", "",
                  "float = the trained network before quantisation; quantised = straight after quantisation; "
                  "decoded = from the .kimg file (after quantisation-aware fine-tuning), the number plotted.", "",
                  "| image | codec | target | bpp | numbers | model | quantisation | float | quantised | decoded | decode s |",
                  "|" + "---|" * 11]
        for name in neural:
            for img, entry in codecs[name]["per_image"].items():
                r = entry["results"]
                for k, setting in enumerate(r["setting"]):
                    spec = r["spec"][k]
                    model = "widths " + ",".join(map(str, spec["widths"])) + (f"; grids {','.join(map(str, spec['grids']))}" if "grids" in spec else "")
                    lines.append(f"| {img} | {name} | {setting.split()[1]} | {r['bpp'][k]:.4f} | {r['params'][k]:,} | {model} | {r['quant'][k]} | "
                                 f"{r['psnr_float'][k]:.2f} | {r['psnr_quantized_no_qat'][k]:.2f} | {r['psnr'][k]:.2f} | {r['decode_seconds'][k]:.2f} |")
    if len(images) > 1 and REFERENCE in codecs:
        lines += ["", "## BD metrics against JPEG per image", "", "| codec | " + " | ".join(i["name"] for i in images) + " |",
                  "|" + "---|" * (1 + len(images))]
        for name, entry in codecs.items():
            if name == REFERENCE or "bd_vs_jpeg" not in entry:
                continue
            cells = [f"{_fmt(b['bd_rate_percent'], 1, True)} % / {_fmt(b['bd_psnr_db'], 2, True)} dB"
                     for b in (entry["bd_vs_jpeg"]["per_image"][i["name"]] for i in images)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
