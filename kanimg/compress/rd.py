"""Rate–distortion experiments: every codec on every image, per-image and mean curves,
PSNR at the target bit rates, comparisons at equal bpp, and BD metrics against JPEG.

    rd_to_folder(Path("photo.png"), Path("rd-photo"), RDConfig(models=["kan", "siren"], bpps=[0.1, 0.3, 1.0]))

(kanimg.compress.report writes the folder.)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator
from tqdm.auto import tqdm

from .. import distributed
from ..errors import KanimgError
from ..io import ImageData, list_images, load_image, safe_name
from ..results import results_payload, source_digest
from .bd import bd_psnr, bd_rate
from .codecs import CLASSIC, NEURAL, Point, get_codec, measure, run_sweep
from .resume import pixels_sha256, resumable

log = logging.getLogger(__name__)
REFERENCE = "jpeg"
DEFAULT_MODELS = ("latent", "kan", "siren")  # compress's codec first, then the KAN and COIN-style SIREN codecs


@dataclass
class RDConfig:
    """What an RD experiment runs.

    Attributes:
        models: network codecs (latent, latent-kan, kan, siren), one fit per target bpp; the default is
            compress's own codec (latent grids) with the KAN and COIN-style SIREN codecs.
        codecs: classic codecs (jpeg, webp, avif), a quality sweep each.
        bpps: target bit rates.
        neural: CompressConfig options for the network codecs (steps, qat_steps, bits, …).
    """

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    codecs: list[str] = field(default_factory=lambda: list(CLASSIC))
    bpps: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 1.0])
    neural: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.models:
            if name not in NEURAL:
                raise KanimgError(f"unknown model {name!r} for --models; choose from {', '.join(NEURAL)}")
        for name in self.codecs:
            if name not in CLASSIC:
                raise KanimgError(f"unknown codec {name!r} for --codecs; choose from {', '.join(CLASSIC)}")
        if not self.bpps or any(not (b > 0 and math.isfinite(b)) for b in self.bpps):
            raise KanimgError(f"--bpp needs positive bit rates, got {self.bpps}")
        if not self.models and not self.codecs:
            raise KanimgError("nothing to compare: give --models and/or --codecs")
        self.bpps = sorted(set(float(b) for b in self.bpps))

    @property
    def codec_names(self) -> list[str]:
        return list(self.models) + [c for c in self.codecs if c not in self.models]


@dataclass
class ImageResult:
    name: str
    path: str
    width: int
    height: int
    channels: int
    points: dict[str, list[Point]]  # codec → measured points, in sweep order (quality or target bpp)
    bitstreams: dict[str, list[bytes]] = field(default_factory=dict)  # network codec → .kimg bytes per point


@dataclass
class RDResult:
    config: RDConfig
    images: list[ImageResult]
    descriptions: dict[str, str]


class PointCache:
    """The finished network points of an RD experiment, one JSON file each beside its .kimg
    file, so an interrupted experiment (Ctrl-C, kill -9) continues where it stopped: a point is
    reused only when its image pixels, codec, target bpp and codec options are the same, and
    kanimg's source is (a changed default measures another curve)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(image: ImageData, codec: str, bpp: float, options: dict[str, Any]) -> dict[str, Any]:
        return {"image": image.name, "pixels_sha256": pixels_sha256(image), "codec": codec, "bpp": bpp, "options": options,
                "kanimg_source": source_digest()}

    def _path(self, key: dict[str, Any], suffix: str) -> Path:
        """The point's file: e.g. photo-kan-0.3bpp.json (named whole: a bpp's dot is no suffix).
        A training state's name also carries a digest of the whole key, since it holds no point
        key to compare: another experiment's state at the same bpp is then another's file."""
        name = f"{safe_name(key['image'])}-{key['codec']}-{key['bpp']:g}bpp"
        if suffix == ".partial.pt":
            name += "-" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.folder / f"{name}{suffix}"

    def load(self, key: dict[str, Any]) -> tuple[Point, bytes] | None:
        """The point saved for ``key``, or None; only plain files count (not a link, nor a pipe
        that would block the read)."""
        try:
            files = [self._path(key, ".json"), self._path(key, ".kimg")]
            if not all(stat.S_ISREG(file.lstat().st_mode) for file in files):
                return None
            saved = json.loads(files[0].read_text())
            data = files[1].read_bytes()
            if saved["key"] != json.loads(json.dumps(key)) or saved["point"]["bytes"] != len(data):
                return None
            return Point(**saved["point"]), data
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def others(self, expected: list[dict[str, Any]]) -> int:
        """How many pieces of work here (finished points, or a point's training state) are not
        among the ``expected`` points (this experiment's keys): another experiment's, stopped."""
        keys = [json.loads(json.dumps(key)) for key in expected]
        states = {self._path(key, ".partial.pt").name for key in expected}
        count = 0
        for file in self.folder.glob("*"):
            if file.name.endswith(".partial.pt"):
                count += file.name not in states
            elif file.suffix == ".json":
                try:
                    count += json.loads(file.read_text())["key"] not in keys
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return count

    def keep_only(self, expected: list[dict[str, Any]]) -> None:
        """Remove every file here but the ``expected`` points' (another experiment's points, handed
        over from a replaced folder and not reused, or a stopped one's training state)."""
        if not self.folder.is_dir() or self.folder.is_symlink():
            return
        names = {self._path(key, suffix).name for key in expected for suffix in (".json", ".kimg")}
        for entry in self.folder.iterdir():
            if entry.name not in names:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if not names:
            self.folder.rmdir()

    def state_path(self, key: dict[str, Any]) -> Path:
        """Where the point's training keeps its state while it runs (see :mod:`kanimg.compress.resume`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self._path(key, ".partial.pt")

    def save(self, key: dict[str, Any], point: Point, data: bytes) -> None:
        from ..files import atomic_write_bytes, write_json

        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._path(key, ".kimg"), data)
        write_json(self._path(key, ".json"), {"key": key, "point": asdict(point)})  # last: the point is complete
        self._path(key, ".partial.pt").unlink(missing_ok=True)


def check_experiment(path: Path, config: RDConfig) -> tuple[list[Path], dict[str, Any], list[dict[str, Any]]]:
    """The image files and codecs of an experiment, every image checked against every codec
    (before hours of fitting), and the keys of its network points. One image is held at a
    time: a folder of large photos would not fit in memory at once."""
    files = list_images(path)
    codecs = {name: get_codec(name, {**config.neural, "progress": False} if name in NEURAL else None) for name in config.codec_names}
    keys = []
    for file in files:
        image = load_image(file)
        for bpps in ((), config.bpps):  # what each codec can store first, then what each target can hold
            for codec in codecs.values():
                codec.check(image, bpps)
        keys += [PointCache.key(image, name, bpp, config.neural) for name in config.models for bpp in config.bpps]
        del image  # before the next one is read
    return files, codecs, keys


def fit_network_points(path: Path, config: RDConfig, cache: PointCache, place: distributed.World) -> None:
    """This rank's share of the experiment's network points (image × network × target bpp),
    fitted into ``cache``; run_rd then finds them there. Returns when every rank is done;
    raises KeyboardInterrupt on rank 0 when any rank was interrupted."""
    files, codecs, _ = check_experiment(path, config)
    work = [(file, name, bpp) for file in files for name in config.models for bpp in sorted(config.bpps)]
    stopped, loaded = False, (None, None)
    try:
        for _, (file, name, bpp) in place.share(work):
            if loaded[0] != file:
                loaded = (None, None)  # the previous image goes before the next one is read
                loaded = (file, load_image(file))
            with distributed.alone():  # each point is this rank's own fit
                _run_neural(codecs[name], loaded[1], [bpp], [], cache, config.neural, rank=place.rank)
    except KeyboardInterrupt:  # finished points are in the cache; the ranks still meet
        stopped = True
    if any(distributed.gather(place, stopped)) or (stopped and not place.is_main):
        raise KeyboardInterrupt


def run_rd(path: Path, config: RDConfig, progress: bool = True, cache: PointCache | None = None) -> RDResult:
    """Measure every codec of ``config`` on the image (or the folder of images) at ``path``;
    network points found in ``cache`` are reused and new ones are added to it."""
    files, codecs, _ = check_experiment(path, config)
    results = []
    bar = tqdm(total=len(files) * len(codecs), disable=not progress, unit="curve", desc="rate–distortion", leave=False)
    try:
        for file in files:
            image = load_image(file)
            points: dict[str, list[Point]] = {}
            streams: dict[str, list[bytes]] = {}
            for name, codec in codecs.items():
                bar.set_postfix_str(f"{image.name}: {name}")
                if name in NEURAL:
                    collected: list[bytes] = []
                    points[name] = _run_neural(codec, image, config.bpps, collected, cache, config.neural)
                    streams[name] = collected
                else:
                    points[name] = run_sweep(codec, image, config.bpps)
                log.info("%s %s: %s", image.name, name, ", ".join(f"{p.bpp:.3f} bpp {p.psnr:.2f} dB" for p in points[name]))
                bar.update(1)
            results.append(ImageResult(image.name, str(file), image.width, image.height, image.channels, points, streams))
            del image  # before the next one is read
    finally:
        bar.close()
    return RDResult(config, results, {name: codec.description for name, codec in codecs.items()})


def _run_neural(codec, image: ImageData, bpps: Sequence[float], bitstreams: list[bytes], cache: PointCache | None,
                options: dict[str, Any], rank: int = 0) -> list[Point]:
    """A network codec's points (one fit per target, ascending), keeping each point's .kimg
    bytes; a point measured here records ``rank`` as the one that fitted it."""
    points = []
    for bpp in sorted(bpps):
        key = PointCache.key(image, codec.name, bpp, options)
        cached = cache.load(key) if cache is not None else None
        if cached is not None:
            log.info("%s %s at %g bpp: measured earlier, reused", image.name, codec.name, bpp)
            point, data = cached
        else:
            started = time.perf_counter()
            with resumable(cache.state_path(key)) if cache is not None else contextlib.nullcontext():
                encoded = next(codec.sweep(image, [bpp]))
            point, data = measure(codec, image, encoded, time.perf_counter() - started), encoded.data
            point.info["rank"] = rank
            if cache is not None:
                cache.save(key, point, data)
        points.append(point)
        bitstreams.append(data)
    return points


# ----------------------------------------------------------------------------- analysis
def psnr_at(points: Sequence[Point], bpp: float) -> float | None:
    """PSNR interpolated at ``bpp`` (monotone cubic in log-rate); None outside the measured range."""
    bpps = np.array([p.bpp for p in points], dtype=np.float64)
    psnrs = np.array([p.psnr for p in points], dtype=np.float64)
    keep = np.isfinite(psnrs) & (bpps > 0)
    bpps, psnrs = bpps[keep], psnrs[keep]
    if bpps.size == 0 or not bpps.min() <= bpp <= bpps.max():
        return None
    order = np.argsort(bpps)
    x, y = np.log(bpps[order]), psnrs[order]
    unique, first = np.unique(x, return_index=True)  # equal sizes (e.g. AVIF at its lowest qualities)
    y = np.array([y[x == u].max() for u in unique])
    if unique.size == 1:
        return float(y[0])
    return float(PchipInterpolator(unique, y)(math.log(bpp)))


def mean_curve(per_image: Sequence[Sequence[Point]]) -> tuple[list[float], list[float]]:
    """CompressAI's mean curve: bpp and PSNR averaged over images setting by setting (over the
    settings every image reached)."""
    count = min(len(points) for points in per_image)
    by_setting = [list(points)[:count] for points in per_image]
    bpp = [float(np.mean([pts[i].bpp for pts in by_setting])) for i in range(count)]
    psnr = [float(np.mean([pts[i].psnr for pts in by_setting])) for i in range(count)]
    return bpp, psnr


def bd_against(ref: dict[str, Any], curve: dict[str, Any]) -> dict[str, float | None]:
    """BD-rate and BD-PSNR of ``curve`` against ``ref`` (each a results dict with bpp and psnr)."""
    args = (ref["bpp"], ref["psnr"], curve["bpp"], curve["psnr"])
    return {"bd_rate_percent": bd_rate(*args), "bd_psnr_db": bd_psnr(*args)}


def summarise(result: RDResult) -> dict[str, Any]:
    """The results.json payload (kanimg.results' schema): a record per image × codec × point,
    the mean curve of each codec as its mean records; beside them, per codec its mean and
    per-image curves (CompressAI layout: name, description, results{bpp, psnr, …}), PSNR at
    the targets, BD vs JPEG (``bd_vs_jpeg``; the networks also ``bd_vs_webp`` and
    ``bd_vs_avif``, where those ran), and the network points compared with every other codec at the
    same bpp."""
    config = result.config
    codecs: dict[str, Any] = {}
    for name in config.codec_names:
        per_image = {img.name: _curve(img.points[name]) for img in result.images}
        mean_bpp, mean_psnr = mean_curve([img.points[name] for img in result.images])
        entry: dict[str, Any] = {
            "name": name, "description": result.descriptions[name],
            "results": {"bpp": mean_bpp, "psnr": mean_psnr},
            "per_image": {k: {"results": v} for k, v in per_image.items()},
            "at_target": {"bpp": config.bpps, "psnr": [_mean_or_none([psnr_at(img.points[name], b) for img in result.images]) for b in config.bpps]},
        }
        if name in NEURAL:
            for key in ("psnr_float", "psnr_quantized_no_qat"):
                entry["results"][key] = [float(np.mean(v)) for v in zip(*(c[key] for c in per_image.values()))]
        codecs[name] = entry
    for name, entry in codecs.items():  # every codec against JPEG; the networks against every classic codec too
        for ref_name in [c for c in CLASSIC if c in codecs and c != name and (name in NEURAL or c == REFERENCE)]:
            ref = codecs[ref_name]
            entry[f"bd_vs_{ref_name}"] = {
                **bd_against(ref["results"], entry["results"]),
                "per_image": {img: bd_against(ref["per_image"][img]["results"], curve["results"]) for img, curve in entry["per_image"].items()}}
    protocol = {"kind": "rd", "bpp_targets": config.bpps, "reference": REFERENCE, "models": config.models, "codecs": config.codecs,
                "neural": config.neural}
    records = [{"image": img.name, "codec": name, **_point_record(point)} for img in result.images for name in config.codec_names
               for point in img.points[name]]
    mean = [{"codec": name, "images": len(result.images), "bpp": b, "psnr": p}
            for name, entry in codecs.items() for b, p in zip(entry["results"]["bpp"], entry["results"]["psnr"])]
    return results_payload(
        "rd", protocol, records, mean,
        name="kanimg rate-distortion",
        images=[{"name": i.name, "path": i.path, "width": i.width, "height": i.height, "channels": i.channels} for i in result.images],
        bpp_targets=config.bpps, reference=REFERENCE, codecs=codecs, comparisons=comparisons(result),
        config={"models": config.models, "codecs": config.codecs, "neural": config.neural},
    )


def _point_record(point: Point) -> dict[str, Any]:
    return {"setting": point.setting, "bpp": point.bpp, "psnr": point.psnr, "bytes": point.bytes,
            "encode_seconds": point.encode_seconds, "decode_seconds": point.decode_seconds, "rank": 0, **point.info}


def _curve(points: Sequence[Point]) -> dict[str, list]:
    out: dict[str, list] = {"bpp": [p.bpp for p in points], "psnr": [p.psnr for p in points], "bytes": [p.bytes for p in points],
                            "setting": [p.setting for p in points], "encode_seconds": [p.encode_seconds for p in points],
                            "decode_seconds": [p.decode_seconds for p in points]}
    for key in ("psnr_float", "psnr_quantized_no_qat", "quant", "params", "spec"):
        if points and key in points[0].info:
            out[key] = [p.info[key] for p in points]
    return out


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def comparisons(result: RDResult) -> list[dict[str, Any]]:
    """Every network point against every other codec interpolated at that point's bpp."""
    rows = []
    for img in result.images:
        for name in result.config.models:
            for point in img.points[name]:
                others = {other: psnr_at(img.points[other], point.bpp) for other in result.config.codec_names if other != name}
                rows.append({"image": img.name, "codec": name, "setting": point.setting, "bpp": point.bpp, "psnr": point.psnr,
                             "others": others,
                             "delta": {k: (None if v is None else point.psnr - v) for k, v in others.items()}})
    return rows
