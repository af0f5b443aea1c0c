"""What an RD experiment writes: results.json/csv/md (kanimg.results' schema, with CompressAI-
style curves), the RD plot(s) and the networks' .kimg bitstreams, all built in a staging
folder and moved into place."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import KanimgError
from ..files import RunFolder, atomic_write_bytes, carry_over, check_writable, read_marker
from ..io import safe_name
from ..plots import plot_rd
from ..results import markdown_table, write_results
from .codecs import CLASSIC, NEURAL
from .rd import REFERENCE, PointCache, RDConfig, RDResult, check_experiment, fit_network_points, run_rd, summarise

POINTS = "points"  # the network points' folder, in the staging folder and in the finished one
CSV_KEYS = ["image", "codec", "setting", "bpp", "psnr", "bytes", "encode_seconds", "decode_seconds", "psnr_float",
            "psnr_quantized_no_qat", "quant", "params", "rank"]


def rd_to_folder(path: Path, out: Path, config: RDConfig, force: bool = False, progress: bool = True,
                 command: str | None = None) -> dict[str, Any]:
    """Run the experiment on ``path`` (image or folder) and write every output into ``out``.

    The folder is checked before any work (an existing one needs ``force``) and appears only
    when everything is written. Every finished network point is kept at once in the staging
    folder (``.NAME.partial/points``), so the same command after Ctrl-C or a kill continues
    where it stopped, and stays in the finished folder (``points``): an rd folder replaced with
    ``force`` hands its points to the new experiment, which reuses those whose image, codec,
    target, options and kanimg source are its own (a target or a codec added to an experiment
    fits only what is new). Returns the results.json payload.

    Under torchrun the network points are shared out among the ranks (each fits its share
    into the staging folder's points); rank 0 then measures the classic codecs and writes
    everything, the same as one process would (other ranks return an empty dict).
    """
    run = RunFolder(Path(out), "rd", replace=force)  # the output's own checks first (nothing written) …
    if run.final.parent.is_dir():
        check_writable(run.final.parent)
    _, _, expected = check_experiment(Path(path), config)  # … then every image and target, before the folder is claimed
    place = distributed.world()
    with contextlib.ExitStack() as stack:
        def claim_folder() -> Path:
            staging = stack.enter_context(run)
            if run.leftover and not force:  # this experiment's end would delete another's points
                others = PointCache(staging / POINTS).others(expected)
                if others:
                    raise KanimgError(f"{out}: {others} network point(s) of another rd experiment (other options, or "
                                      f"kanimg's source since changed; finished or in training) wait in {staging}; run "
                                      f"that command again with that kanimg to finish it, or pass --force to discard them")
            points, replaced = staging / POINTS, run.final / POINTS
            if points.is_symlink():  # not one kanimg made: its points would be written (and pruned) elsewhere
                points.unlink()
            if (expected and replaced.is_dir() and not replaced.is_symlink()
                    and (read_marker(run.final) or {}).get("kind") == "rd"):
                points.mkdir(exist_ok=True)
                carry_over(replaced, points)  # hard links: the old folder stays whole until replaced
            return staging

        staging = distributed.main_first(place, claim_folder)
        cache = PointCache(staging / POINTS)
        if place.size > 1:
            fit_network_points(Path(path), config, cache, place)  # every rank's points in the cache
        if not place.is_main:
            return {}
        result = run_rd(Path(path), config, progress=progress, cache=cache)
        summary = summarise(result)
        if command:
            summary["command"] = command
        write_report(result, summary, staging)
        cache.keep_only(expected)  # this experiment's points, for the next one into this folder
    return summary


def write_report(result: RDResult, summary: dict[str, Any], folder: Path) -> None:
    write_results(folder, summary, csv_keys=CSV_KEYS, markdown=markdown(summary))
    names = list(summary["codecs"])
    title = ", ".join(i["name"] for i in summary["images"])
    mean = {n: summary["codecs"][n]["results"] for n in names}
    plot_rd(folder / "rd.png", mean, f"{title}" + (" (mean)" if len(summary["images"]) > 1 else ""), summary["bpp_targets"])
    if len(summary["images"]) > 1:
        for img in summary["images"]:
            curves = {n: summary["codecs"][n]["per_image"][img["name"]]["results"] for n in names}
            plot_rd(folder / f"rd-{safe_name(img['name'])}.png", curves, img["name"], summary["bpp_targets"])
    streams = folder / "kimg"
    for img in result.images:
        for name, blobs in img.bitstreams.items():
            for point, blob in zip(img.points[name], blobs):
                streams.mkdir(exist_ok=True)
                atomic_write_bytes(streams / f"{safe_name(img.name)}-{name}-{point.setting.split()[1]}bpp.kimg", blob)


# ----------------------------------------------------------------------------- Markdown
def _fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _bd_cells(bd: dict[str, Any]) -> list[str]:
    """BD-rate and BD-PSNR with their units, or — where they are undefined."""
    rate, gain = bd["bd_rate_percent"], bd["bd_psnr_db"]
    return [_fmt(rate, 1, True) + (" %" if rate is not None else ""), _fmt(gain, 2, True) + (" dB" if gain is not None else "")]


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
    rows = []
    for name, entry in codecs.items():
        if name in NEURAL:
            res = entry["results"]
            cells = [f"{p:.2f} ({b:.3f})" for b, p in zip(res["bpp"], res["psnr"])]
        else:
            cells = [_fmt(v) for v in entry["at_target"]["psnr"]]
        bd = entry.get("bd_vs_jpeg")
        bd_cells = ["reference", ""] if name == REFERENCE else (_bd_cells(bd) if bd else ["—", "—"])
        rows.append([name, *cells, *bd_cells])
    lines.append(markdown_table(["codec", *(f"{t:g} bpp" for t in targets), "BD-rate vs JPEG", "BD-PSNR vs JPEG"], rows))
    others = list(codecs)
    if summary["comparisons"]:
        lines += ["", "## Networks against every codec at the same bpp", "",
                  "Each network file against the other codecs' PSNR interpolated at exactly its bpp (difference in brackets: "
                  "positive = the network is better).", ""]
        rows = []
        for row in summary["comparisons"]:
            cells = []
            for other in others:
                if other == row["codec"]:
                    cells.append("")
                else:
                    v, d = row["others"].get(other), row["delta"].get(other)
                    cells.append("—" if v is None else f"{v:.2f} ({d:+.2f})")
            rows.append([row["image"], row["codec"], f"{row['bpp']:.3f}", f"{row['psnr']:.2f}", *cells])
        lines.append(markdown_table(["image", "codec", "bpp", "PSNR", *others], rows))
    neural = [n for n in codecs if n in NEURAL]
    if neural:
        lines += ["", "## Networks: PSNR before and after quantisation", "",
                  "float = the trained network before quantisation; quantised = straight after quantisation; "
                  "decoded = from the .kimg file (after quantisation-aware fine-tuning), the number plotted.", ""]
        rows = []
        for name in neural:
            for img, entry in codecs[name]["per_image"].items():
                r = entry["results"]
                for k, setting in enumerate(r["setting"]):
                    spec = r["spec"][k]
                    model = "widths " + ",".join(map(str, spec["widths"])) + (f"; grids {','.join(map(str, spec['grids']))}" if "grids" in spec else "")
                    rows.append([img, name, setting.split()[1], f"{r['bpp'][k]:.4f}", f"{r['params'][k]:,}", model, r["quant"][k],
                                 f"{r['psnr_float'][k]:.2f}", f"{r['psnr_quantized_no_qat'][k]:.2f}", f"{r['psnr'][k]:.2f}",
                                 f"{r['decode_seconds'][k]:.2f}"])
        lines.append(markdown_table(["image", "codec", "target", "bpp", "numbers", "model", "quantisation", "float", "quantised",
                                     "decoded", "decode s"], rows))
    classic = [c for c in CLASSIC if c in codecs]
    if neural and classic:
        lines += ["", "## Networks: BD metrics against each classic codec", "",
                  "BD-rate (negative = fewer bits for the same PSNR) / BD-PSNR over the range both curves cover"
                  + (", for the mean curves and per image" if len(images) > 1 else "") + " (— = fewer than 4 points or no overlap).", ""]
        rows = []
        for name in neural:
            for label in (["mean"] if len(images) > 1 else []) + [i["name"] for i in images]:
                cells = []
                for ref_name in classic:
                    bd = codecs[name][f"bd_vs_{ref_name}"]
                    bd = bd if label == "mean" else bd["per_image"][label]
                    cells.append(" / ".join(_bd_cells(bd)))
                rows.append([name, label, *cells])
        lines.append(markdown_table(["network", "image", *(f"vs {c}" for c in classic)], rows))
    if len(images) > 1 and REFERENCE in codecs:
        lines += ["", "## BD metrics against JPEG per image", ""]
        rows = []
        for name, entry in codecs.items():
            if name == REFERENCE or "bd_vs_jpeg" not in entry:
                continue
            cells = [" / ".join(_bd_cells(entry["bd_vs_jpeg"]["per_image"][i["name"]])) for i in images]
            rows.append([name, *cells])
        lines.append(markdown_table(["codec", *(i["name"] for i in images)], rows))
    return "\n".join(lines) + "\n"
