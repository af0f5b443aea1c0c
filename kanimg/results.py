"""The one results schema of every experiment (compare, rd) and its tables.

A results folder holds results.json::

    {"kind": "compare" | "rd", "protocol": {"kind": …, …}, "records": [one per image × model or
     image × codec × point], "mean": [over images], "machine": {…}, "versions": {…}, …}

(an experiment may add its own keys beside these: rd adds the CompressAI-style curves), the
same records as results.csv, and results.md. Everything here only formats what the runs
measured; nothing trains.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
import os
import platform
from pathlib import Path
from typing import Any, Sequence

from .files import atomic_write_bytes, write_json

# (record key, heading, format) of a compare record's tables (Markdown, HTML, CSV)
COMPARE_COLUMNS = [
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


@functools.cache
def source_digest(root: Path = Path(__file__).resolve().parent) -> str:
    """A digest of kanimg's own source files (those under ``root``). The version number does not
    change with every default, so kept work (rd's points, an encode's training state) is keyed
    by this too: work that other code measured is never taken for this code's."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Library versions recorded with every result."""
    import numpy as np
    import PIL
    import scipy
    import skimage
    import torch

    from . import __version__

    return {
        "kanimg": __version__, "kanimg_source": source_digest(), "python": platform.python_version(), "torch": str(torch.__version__),
        "numpy": np.__version__, "pillow": PIL.__version__, "scikit-image": skimage.__version__, "scipy": scipy.__version__,
    }


def machine() -> dict[str, Any]:
    """Where the results were measured."""
    import torch

    return {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_protocol(protocol: dict) -> str:
    """One sentence saying under which protocol a result was measured."""
    kind = protocol.get("kind")
    if kind == "time":
        return f"equal wall-clock, {protocol['budget_seconds']:g} s of training per model"
    if kind == "params":
        return f"equal parameter count, widths solved for {protocol['params']:,} parameters"
    if kind == "preset":
        return f"preset {protocol['preset']} (every model with the same recipe)"
    if kind == "rd":
        return (f"rate–distortion: networks fitted for {', '.join(f'{b:g}' for b in protocol['bpp_targets'])} bpp, "
                f"classic codecs over their quality range, bpp from file bytes")
    return "equal steps, each family with its own best-known settings"


def fmt(value: Any, spec: str) -> str:
    """A table cell: ``spec`` applied to ``value``; n/a for missing or non-finite values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return spec.format(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align_first_left: bool = True) -> str:
    """A Markdown table of already formatted cells (numbers right-aligned, the first column left)."""
    sep = "|" + "|".join("---" if i == 0 and align_first_left else "---:" for i in range(len(headers))) + "|"
    return "\n".join(["| " + " | ".join(headers) + " |", sep, *("| " + " | ".join(row) + " |" for row in rows)])


def record_table(records: Sequence[dict], columns: Sequence[tuple[str, str, str]] = COMPARE_COLUMNS) -> str:
    """A Markdown table of records, one row each, ``columns`` = (key, heading, format)."""
    return markdown_table([h for _, h, _ in columns], [[fmt(r.get(k), s) for k, _, s in columns] for r in records])


def mean_records(records: list[dict], group: str = "model",
                 keys: Sequence[str] = ("psnr", "psnr_png", "ssim", "lpips", "params", "seconds", "steps", "steps_per_second")
                 ) -> list[dict]:
    """Per-``group`` means over images of ``keys`` (params rounded). None where any record lacks
    the key's value: a mean over some of the images would read as one over all of them (an exact
    reconstruction's PSNR is infinite, which JSON stores as null; SSIM is undefined on a thin image)."""
    out = []
    for name in dict.fromkeys(r[group] for r in records):
        rows = [r for r in records if r[group] == name]
        mean = {group: name, "images": len({r["image"] for r in rows}), "device": rows[0].get("device")}
        for key in keys:
            values = [r.get(key) for r in rows]
            finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            average = sum(values) / len(values) if finite else None
            mean[key] = round(average) if key == "params" and average is not None else average
        out.append(mean)
    return out


def results_payload(kind: str, protocol: dict, records: list[dict], mean: list[dict], **extra: Any) -> dict:
    """The results.json payload of the schema above (machine and versions added)."""
    return {"kind": kind, "protocol": protocol, "records": records, "mean": mean, **extra, "machine": machine(), "versions": versions()}


def write_results(folder: Path, payload: dict, *, csv_keys: Sequence[str], markdown: str) -> None:
    """Write results.json (``payload``), results.csv (``csv_keys`` of each record; a protocol as
    its sentence) and results.md (``markdown``)."""
    write_json(Path(folder) / "results.json", payload)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(csv_keys), extrasaction="ignore")
    writer.writeheader()
    for r in payload["records"]:
        writer.writerow({**r, **({"protocol": describe_protocol(r["protocol"])} if isinstance(r.get("protocol"), dict) else {})})
    atomic_write_bytes(Path(folder) / "results.csv", buf.getvalue().encode())
    atomic_write_bytes(Path(folder) / "results.md", markdown.encode())
