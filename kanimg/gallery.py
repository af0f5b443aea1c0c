"""Side-by-side comparison outputs: gallery PNG, self-contained HTML, results JSON/CSV/Markdown.

Everything here only reads what the runs wrote (records + image arrays); nothing trains.
A record is one image × model result: model, psnr, ssim, lpips, params, seconds, protocol, …
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .export import write_json
from .files import atomic_path, atomic_write_bytes

TABLE_COLUMNS = [  # (record key, heading, format)
    ("model", "model", "{}"),
    ("psnr", "PSNR (dB)", "{:.2f}"),
    ("psnr_png", "PSNR PNG (dB)", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("lpips", "LPIPS", "{:.4f}"),
    ("params", "params", "{:,}"),
    ("seconds", "train time (s)", "{:.1f}"),
    ("steps", "steps", "{:,}"),
    ("steps_per_second", "steps/s", "{:.1f}"),
    ("device", "device", "{}"),
]


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return spec.format(value)


def _display(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) [0, 1] → something imshow shows as the image looks (grey, RGB; alpha dropped)."""
    pixels = np.clip(pixels, 0, 1)
    return pixels[..., 0] if pixels.shape[2] <= 2 else pixels[..., :3]


def error_scale(original: np.ndarray, reconstructions: Sequence[np.ndarray]) -> float:
    """One colour scale for every error map: the 99.5th percentile error over all models."""
    errors = np.concatenate([np.abs(np.clip(r, 0, 1) - original).mean(axis=2).ravel() for r in reconstructions])
    return float(max(np.percentile(errors, 99.5), 1e-3))


def gallery_png(path: Path, original: np.ndarray, records: list[dict], reconstructions: list[np.ndarray],
                title: str, crop: tuple[int, int, int, int] | None = None) -> None:
    """Original + labelled reconstructions, a row of error maps on one shared scale, and an
    optional zoomed crop (x, y, width, height) of each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(records) + 1
    rows = 3 if crop else 2
    height, width = original.shape[:2]
    panel = 2.6
    fig = Figure(figsize=(panel * n, panel * rows * height / width + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, n, squeeze=False)
    vmax = error_scale(original, reconstructions)
    grey = original.shape[2] <= 2
    images = [original, *reconstructions]
    labels = ["original"] + [f"{r['model']}\n{r['params']:,} params · {fmt(r['psnr'], '{:.2f}')} dB" for r in records]
    for col, (img, label) in enumerate(zip(images, labels)):
        ax = axes[0, col]
        ax.imshow(_display(img), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        if crop:
            ax.add_patch(Rectangle((crop[0] - 0.5, crop[1] - 0.5), crop[2], crop[3], fill=False, ec="yellow", lw=1))
            x, y, w, h = crop
            zoom = axes[2, col]
            zoom.imshow(_display(img[y : y + h, x : x + w]), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
        err_ax = axes[1, col]
        if col == 0:
            err_ax.text(0.5, 0.5, f"|error|, shared scale\n0 … {vmax:.3f}", ha="center", va="center", fontsize=8)
        else:
            shown = err_ax.imshow(np.abs(np.clip(img, 0, 1) - original).mean(axis=2), cmap="inferno", vmin=0, vmax=vmax,
                                  interpolation="nearest")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1, 0].set_axis_off()
    if len(records):
        fig.colorbar(shown, ax=axes[1, :].tolist(), shrink=0.8, label="mean |error| per pixel")
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def psnr_time_svg(histories: dict[str, dict]) -> str:
    """Inline SVG of full-image PSNR against training time, one line per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for model, hist in histories.items():
        ax.plot(hist["eval_seconds"], hist["eval_psnr"], "o-", ms=2.5, lw=1.2, label=model)
    ax.set(xlabel="training time (s)", ylabel="PSNR (dB)", title="PSNR against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]


def png_data_uri(pixels: np.ndarray) -> str:
    """(H, W, C) float [0, 1] → data:image/png;base64,… (8-bit, channels kept)."""
    from PIL import Image

    ints = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(ints[..., 0] if ints.shape[2] == 1 else ints).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _table_html(records: list[dict], table_id: str) -> str:
    head = "".join(f"<th onclick=\"sortTable('{table_id}', {i})\">{html.escape(h)}</th>" for i, (_, h, _) in enumerate(TABLE_COLUMNS))
    rows = []
    for r in records:
        cells = []
        for key, _, spec in TABLE_COLUMNS:
            value = r.get(key)
            sort_key = value if isinstance(value, (int, float)) and value is not None and math.isfinite(value) else ""
            cells.append(f"<td data-sort=\"{html.escape(str(sort_key))}\">{html.escape(fmt(value, spec))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table id=\"{table_id}\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


_SCRIPT = """
function sortTable(id, col) {
  const table = document.getElementById(id), body = table.tBodies[0];
  const rows = Array.from(body.rows), asc = table.dataset.sortCol == col && table.dataset.sortDir != 'asc';
  rows.sort((a, b) => {
    const x = a.cells[col].dataset.sort || a.cells[col].textContent, y = b.cells[col].dataset.sort || b.cells[col].textContent;
    const nx = parseFloat(x), ny = parseFloat(y);
    const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return asc ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
  table.dataset.sortCol = col; table.dataset.sortDir = asc ? 'asc' : 'desc';
}

// The before/after viewer: a reconstruction over its original in one transformed container,
// so zoom (wheel) and pan (drag) move both alike; the slider sets how much of the original shows.
const view = {scale: 1, x: 0, y: 0, drag: null};
function part(id) { return document.getElementById(id); }
function placeLayers() {
  part('viewer-layers').style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
  part('viewer-line').style.borderLeftWidth = `${1.5 / view.scale}px`;  // one screen pixel whatever the zoom
}
function setSplit(value) {
  part('viewer-before').style.clipPath = `inset(0 ${100 - value}% 0 0)`;
  part('viewer-line').style.left = `${value}%`;
}
function openViewer(img) {
  const original = part(img.dataset.original), before = part('viewer-before'), after = part('viewer-after');
  before.src = original.src; after.src = img.src;
  part('viewer-title').textContent = `original (left) | ${img.dataset.label} (right)`;
  part('viewer').hidden = false;
  const stage = part('viewer-stage').getBoundingClientRect(), w = original.naturalWidth, h = original.naturalHeight;
  for (const layer of [before, after]) { layer.style.width = `${w}px`; layer.style.height = `${h}px`; }
  part('viewer-layers').style.width = `${w}px`; part('viewer-layers').style.height = `${h}px`;
  view.scale = Math.min(stage.width / w, stage.height / h) * 0.95;
  view.x = (stage.width - w * view.scale) / 2; view.y = (stage.height - h * view.scale) / 2;
  placeLayers(); setSplit(part('viewer-split').value);
}
function closeViewer() { part('viewer').hidden = true; }
function setUpViewer() {
  const stage = part('viewer-stage');
  stage.addEventListener('wheel', e => {
    e.preventDefault();
    const k = e.deltaY < 0 ? 1.25 : 0.8, r = stage.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
    view.x = px - (px - view.x) * k; view.y = py - (py - view.y) * k; view.scale *= k; placeLayers();
  }, {passive: false});
  stage.addEventListener('mousedown', e => { view.drag = {x: e.clientX - view.x, y: e.clientY - view.y}; e.preventDefault(); });
  window.addEventListener('mousemove', e => { if (view.drag) { view.x = e.clientX - view.drag.x; view.y = e.clientY - view.drag.y; placeLayers(); } });
  window.addEventListener('mouseup', () => { view.drag = null; });
  window.addEventListener('keydown', e => { if (e.key === 'Escape') closeViewer(); });
  part('viewer-split').addEventListener('input', e => setSplit(e.target.value));
}
document.addEventListener('DOMContentLoaded', setUpViewer);
"""

_VIEWER = """<div id='viewer' hidden><div class='viewer-bar'><span id='viewer-title'></span>
<label>original ◀ <input type='range' id='viewer-split' min='0' max='100' value='50'> ▶ reconstruction</label>
<span>wheel: zoom · drag: pan</span><button onclick='closeViewer()'>close (Esc)</button></div>
<div id='viewer-stage'><div id='viewer-layers'><img id='viewer-after' alt='reconstruction'><img id='viewer-before' alt='original'>
<div id='viewer-line'></div></div></div></div>"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
td:first-child, th:first-child { text-align: left; }
.tiles { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; font-size: 0.8em; text-align: center; }
figure img { width: 220px; image-rendering: pixelated; border: 1px solid #ddd; }
.gallery img { max-width: 100%; }
img[data-original] { cursor: zoom-in; }
#viewer { position: fixed; inset: 0; background: #111; color: #eee; z-index: 10; display: flex; flex-direction: column; }
#viewer[hidden] { display: none; }
.viewer-bar { display: flex; gap: 1.5em; align-items: center; padding: 0.5em 1em; font-size: 0.9em; }
.viewer-bar input { width: 16em; vertical-align: middle; }
#viewer-stage { position: relative; flex: 1; overflow: hidden; cursor: grab; }
#viewer-layers { position: absolute; left: 0; top: 0; transform-origin: 0 0; }
#viewer-layers img { position: absolute; left: 0; top: 0; image-rendering: pixelated; max-width: none; }
#viewer-line { position: absolute; top: 0; bottom: 0; width: 0; border-left: 1px solid rgba(255, 255, 255, 0.8); pointer-events: none; }
"""


def html_page(title: str, sections: list[dict], mean_records: list[dict] | None, protocol: dict) -> str:
    """A self-contained HTML report. Each section: {"image", "original" (uri), "records",
    "reconstructions" (uris), "errors" (uris), "gallery" (uri), "curves" (svg)}."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Protocol: {html.escape(describe_protocol(protocol))}. Click a column heading to sort, a reconstruction "
             f"to compare it with the original (slider, zoom and pan).</p>"]
    if mean_records:
        parts.append("<h2>Mean over images</h2>" + _table_html(mean_records, "mean"))
    for i, sec in enumerate(sections):
        parts.append(f"<h2>{html.escape(sec['image'])}</h2>")
        parts.append(_table_html(sec["records"], f"table{i}"))
        tiles = [f"<figure><img id='original{i}' src='{sec['original']}' alt='original'><figcaption>original</figcaption></figure>"]
        for r, rec_uri, err_uri in zip(sec["records"], sec["reconstructions"], sec["errors"]):
            caption = html.escape(f"{r['model']} · {r['params']:,} params · {fmt(r['psnr'], '{:.2f}')} dB")
            label = html.escape(f"{r['model']}, {fmt(r['psnr'], '{:.2f}')} dB")
            tiles.append(f"<figure><img src='{rec_uri}' alt='{html.escape(r['model'])}' data-original='original{i}' data-label='{label}' "
                         f"onclick='openViewer(this)' title='click: compare with the original'><figcaption>{caption}</figcaption></figure>")
            tiles.append(f"<figure><img src='{err_uri}' alt='{html.escape(r['model'])} error'><figcaption>error map</figcaption></figure>")
        parts.append(f"<div class='tiles'>{''.join(tiles)}</div>")
        parts.append(f"<div class='gallery'><img src='{sec['gallery']}' alt='gallery'></div>")
        parts.append(sec["curves"])
    parts.append(_VIEWER)
    parts.append("</body></html>")
    return "\n".join(parts)


def describe_protocol(protocol: dict) -> str:
    kind = protocol.get("kind")
    if kind == "time":
        return f"equal wall-clock, {protocol['budget_seconds']:g} s of training per model"
    if kind == "params":
        return f"equal parameter count, widths solved for {protocol['params']:,} parameters"
    if kind == "preset":
        return f"preset {protocol['preset']} (every model with the same recipe)"
    return "equal steps, each family with its own best-known settings"


def mean_records(records: list[dict]) -> list[dict]:
    """Per-model means over images (metrics, params, seconds)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        mean = {"model": model, "images": len(rows), "device": rows[0].get("device")}
        for key in ("psnr", "psnr_png", "ssim", "lpips", "params", "seconds", "steps", "steps_per_second"):
            values = [r[key] for r in rows if r.get(key) is not None]
            mean[key] = (sum(values) / len(values) if values else None) if key != "params" else (round(sum(values) / len(values)) if values else None)
        out.append(mean)
    return out


def markdown_table(records: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(TABLE_COLUMNS))) + "|"
    rows = ["| " + " | ".join(fmt(r.get(k), s) for k, _, s in TABLE_COLUMNS) + " |" for r in records]
    return "\n".join([head, sep, *rows])


def write_tables(folder: Path, records: list[dict], means: list[dict] | None, protocol: dict) -> None:
    """results.json (one record per image × model), results.csv and results.md."""
    write_json(folder / "results.json", {"protocol": protocol, "records": records, "mean": means})
    keys = ["image", *[k for k, _, _ in TABLE_COLUMNS], "family", "protocol"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({**r, "protocol": describe_protocol(r["protocol"])})
    atomic_write_bytes(folder / "results.csv", buf.getvalue().encode())
    md = [f"Protocol: {describe_protocol(protocol)}.", ""]
    for image in dict.fromkeys(r["image"] for r in records):
        md += [f"### {image}", "", markdown_table([r for r in records if r["image"] == image]), ""]
    if means:
        md += ["### Mean over images", "", markdown_table(means), ""]
    atomic_write_bytes(folder / "results.md", "\n".join(md).encode())
