"""The comparison's self-contained HTML page: sortable tables, the reconstructions as
inline images, and a before/after viewer with synchronised zoom and pan.

Everything here only reads what the runs wrote (records + image arrays); nothing trains.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from .results import COMPARE_COLUMNS, describe_protocol, fmt


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
    head = "".join(f"<th onclick=\"sortTable('{table_id}', {i})\">{html.escape(h)}</th>" for i, (_, h, _) in enumerate(COMPARE_COLUMNS))
    rows = []
    for r in records:
        cells = []
        for key, _, spec in COMPARE_COLUMNS:
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
